"""Tables for results/cpcad.md from cpcad_knn.py's JSON lines: mean ± std over seeds per (set, preset
overrides, score).

Run: ``python results/cpcad_knn_summary.py results/cpcad_knn.jsonl results/cpcad_knn_synth.jsonl``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np

SCORES = ("infonce", "knn", "combined")


def _ms(values, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main(paths: list[str]) -> None:
    runs = defaultdict(list)
    for path in paths:
        for line in open(path):
            record = json.loads(line)
            if record.get("bank_size") is None:  # the first, pre-library run (full bank): reported apart
                continue
            runs[record["set"], json.dumps(record.get("overrides") or {}, sort_keys=True)].append(record)
    print("| set | overrides | seeds | score | image AUROC | pixel AUROC | AUPRO | fit s (threads) |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, overrides), records in runs.items():
        seeds = ",".join(str(r["seed"]) for r in records)
        threads = ",".join(sorted({str(r.get("threads", 1)) for r in records}))
        for score in SCORES:
            print(f"| {name} | `{overrides}` | {seeds} | {score} | {_ms([r[score]['image_auroc'] for r in records])} | "
                  f"{_ms([r[score]['pixel_auroc'] for r in records])} | {_ms([r[score]['aupro'] for r in records])} | "
                  f"{_ms([r['fit_s'] for r in records], 0) + f' ({threads})' if score == 'infonce' else ''} |")
    print()
    print("| set | overrides | score | pixel AUROC per defect type (mean over seeds) |")
    print("|---|---|---|---|")
    for (name, overrides), records in runs.items():
        for score in SCORES:
            defects = records[0][score]["per_defect"]
            cells = [f"{d} {np.mean([r[score]['per_defect'][d]['pixel_auroc'] for r in records]):.2f}" for d in defects]
            print(f"| {name} | `{overrides}` | {score} | {' / '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
