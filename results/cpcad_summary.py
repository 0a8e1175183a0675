"""Summarise results/cpcad_study.jsonl: one row per (set, setting) with mean ± std over seeds.

    python results/cpcad_summary.py [results/cpcad_study.jsonl] [--variants]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def fmt(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    path = next((a for a in sys.argv[1:] if not a.startswith("--")), "results/cpcad_study.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["set"], r["setting"], json.dumps(r.get("extra", {}), sort_keys=True))].append(r)
    print("| set | setting | seeds | image AUROC | pixel AUROC | AUPRO | top-1 image | fit s (threads) | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, setting, extra), rs in groups.items():
        label = setting + ("" if extra == "{}" else f" {extra}")
        print(f"| {name} | {label} | {len(rs)} | {fmt([r['image_auroc'] for r in rs])} | "
              f"{fmt([r['pixel_auroc'] for r in rs])} | {fmt([r['aupro'] for r in rs])} | "
              f"{fmt([r['image_auroc_topk']['1'] for r in rs])} | {np.mean([r['fit_s'] for r in rs]):.0f} "
              f"({rs[0]['threads']}) | {fmt([r['final_loss'] for r in rs])} |")
    if "--variants" in sys.argv:
        print("\n| set | setting | scoring (credit/score_norm) | image AUROC | pixel AUROC | AUPRO |")
        print("|---|---|---|---|---|---|")
        for (name, setting, _), rs in groups.items():
            for key in rs[0].get("variants", {}):
                vs = [r["variants"][key] for r in rs if key in r.get("variants", {})]
                print(f"| {name} | {setting} | {key} | {fmt([v['image_auroc'] for v in vs])} | "
                      f"{fmt([v['pixel_auroc'] for v in vs])} | {fmt([v['aupro'] for v in vs])} |")


if __name__ == "__main__":
    main()
