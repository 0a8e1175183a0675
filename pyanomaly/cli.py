"""Command line: ``pyanomaly info | fit | evaluate | predict | demo``.

    pyanomaly fit --method cpcad --data ROOT --category C --out RUN [--epochs N --image-size S --set k=v]
    pyanomaly evaluate RUN --data ROOT [--category C]
    pyanomaly predict RUN IMAGE... [--heatmap-dir DIR]
    pyanomaly demo [--out DIR]

Each subcommand has its own ``add_<name>_parser`` function (so more can be added beside them) and
its own ``cmd_<name>`` handler. Expected failures (a missing folder, an unknown category or
method, a bad option) print one line and exit with status 2; set PYANOMALY_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "CLIError",
    "build_parser",
    "evaluate_run",
    "fit_run",
    "get_method",
    "main",
    "parse_set",
]

#: ``--method`` name -> (module, class name) or the class. Each follows the ``Detector`` contract.
METHODS: dict[str, Any] = {
    "cpcad": ("pyanomaly.models.cpcad", "CPCAD"),
    "anomem": ("pyanomaly.models.anomem", "AnoMem"),
}


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 2."""


# -- helpers ------------------------------------------------------------------------------------
def get_method(name: str):
    """The detector class registered as ``name``."""
    if name not in METHODS:
        raise CLIError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    entry = METHODS[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(module), cls)


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when possible (1e-3, true, [1, 2])."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def preset_config(method: str, name: str) -> dict[str, Any]:
    """The constructor arguments of ``method``'s preset ``name`` (CLIError when there is none)."""
    try:
        return get_method(method).preset_arguments(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CLIError(f"{what} not found: {path}")


def _run_model_path(run: Path) -> Path:
    _require_dir(run, "run folder")
    model = run / "model.pt"
    if not model.is_file():
        raise CLIError(f"no model.pt in run folder {run} (train one with `pyanomaly fit ... --out {run}`)")
    return model


def _load_detector(run: Path, device: str | None = None):
    from pyanomaly.models.base import Detector

    model = _run_model_path(run)
    config_file = run / "config.json"
    method = json.loads(config_file.read_text())["method"] if config_file.is_file() else None
    cls = get_method(method) if method else Detector
    return cls.load(model, device=device)


def fit_run(method: str, data: str | Path, category: str, out: str | Path, config: dict[str, Any]):
    """Train ``method`` on ``<data>/<category>/train/good``; write out/model.pt and out/config.json."""
    from pyanomaly.data import MVTecDataset

    data, out = Path(data), Path(out)
    _require_dir(data, "data folder")
    cls = get_method(method)
    dataset = MVTecDataset(data, category, "train", grayscale=True)
    try:
        detector = cls(**config)
    except NotImplementedError as exc:
        raise CLIError(f"method {method!r} is not implemented yet ({exc})") from exc
    except TypeError as exc:
        raise CLIError(f"bad option for method {method!r}: {exc}") from exc
    start = time.perf_counter()
    try:
        detector.fit(dataset)
    except NotImplementedError as exc:
        raise CLIError(f"method {method!r} is not implemented yet ({exc})") from exc
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    detector.save(out / "model.pt")
    record = {
        "method": method,
        "data": str(data.resolve()),
        "category": category,
        "config": detector.config(),
        "fit_seconds": round(seconds, 1),
        "train_images": len(dataset),
        "history": list(getattr(detector, "history_", [])),
    }
    (out / "config.json").write_text(json.dumps(record, indent=2))
    return detector


def _colormap(values):
    """Jet-like colormap: (H, W) in [0, 1] -> (H, W, 3) uint8."""
    import numpy as np

    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def save_overlay(path: Path, image, amap, lo: float, hi: float, mask=None) -> None:
    """Write [image | heatmap overlay | mask] side by side as a PNG."""
    import numpy as np
    from PIL import Image

    img = image.numpy()
    gray = img[0] if img.shape[0] == 1 else (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])
    gray_rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    heat = _colormap((amap - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    overlay = (0.5 * gray_rgb + 0.5 * heat).astype(np.uint8)
    panels = [gray_rgb.astype(np.uint8), overlay]
    if mask is not None:
        panels.append(np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def evaluate_run(
    run: str | Path,
    data: str | Path,
    category: str | None = None,
    *,
    heatmaps: bool = True,
    eval_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Score ``<data>/<category>/test``; write ``metrics.json``, ``per_defect.csv`` and ``heatmaps/``.

    Pixel metrics are computed at the images' own size when all test images share it, otherwise
    maps (bilinear) and masks (nearest) are resized to ``eval_size`` (default 256).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pyanomaly.data import MVTecDataset, resize_masks
    from pyanomaly.metrics import aupro, f1_max, image_auroc, pixel_auroc

    run, data = Path(run), Path(data)
    _run_model_path(run)
    _require_dir(data, "data folder")
    if category is None:
        config_file = run / "config.json"
        if not config_file.is_file():
            raise CLIError(f"no --category given and no config.json in {run} to take it from")
        category = json.loads(config_file.read_text())["category"]
    dataset = MVTecDataset(data, category, "test", grayscale=True)
    detector = _load_detector(run, device)
    samples = [dataset[i] for i in range(len(dataset))]
    images = [s.image for s in samples]
    labels = np.array([s.label for s in samples])
    defects = [s.defect_type for s in samples]
    start = time.perf_counter()
    scores, maps = detector.score(images)
    seconds = time.perf_counter() - start
    sizes = {m.shape for m in maps}
    if len(sizes) == 1 and eval_size is None:
        size = next(iter(sizes))
        pix_maps = np.stack(maps)
        masks = np.stack([s.mask.numpy() for s in samples])
    else:
        size = (eval_size or 256,) * 2
        pix_maps = np.stack([
            F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear")[0, 0].numpy()
            for m in maps
        ])
        masks = resize_masks([s.mask for s in samples], size).numpy()

    def block(index) -> dict[str, float | None]:
        lab, msk = labels[index], masks[index]
        out: dict[str, float | None] = {"images": int(len(index))}
        both = 0 < lab.sum() < len(lab)
        out["image_auroc"] = image_auroc(lab, scores[index]) if both else None
        has_pixels = msk.any() and not msk.all()
        out["pixel_auroc"] = pixel_auroc(msk, pix_maps[index]) if has_pixels else None
        out["aupro"] = aupro(msk, pix_maps[index]) if has_pixels else None
        return out

    everything = np.arange(len(samples))
    metrics: dict[str, Any] = {"method": detector.method, "category": category, **block(everything)}
    metrics["image_f1_max"] = f1_max(labels, scores)[0] if labels.any() else None
    metrics["pixel_f1_max"] = f1_max(masks, pix_maps)[0] if masks.any() else None
    metrics["eval_size"] = list(size)
    metrics["score_seconds"] = round(seconds, 1)
    metrics["threshold"] = detector.threshold_
    metrics["predicted_anomalous"] = int((scores > detector.threshold_).sum())
    per_defect = {}
    good = [i for i, d in enumerate(defects) if d == "good"]
    for defect in sorted(set(defects) - {"good"}):
        index = np.array(good + [i for i, d in enumerate(defects) if d == defect])
        per_defect[defect] = block(index)
        per_defect[defect]["images"] = sum(d == defect for d in defects)
    metrics["per_defect"] = per_defect
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(run / "per_defect.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["defect", "images", "image_auroc", "pixel_auroc", "aupro"])
        for defect, row in per_defect.items():
            writer.writerow([defect, row["images"], row["image_auroc"], row["pixel_auroc"], row["aupro"]])
    if heatmaps:
        lo = float(min(m.min() for m in maps))
        hi = float(max(np.quantile(m, 0.999) for m in maps))
        for sample, amap in zip(samples, maps):
            target = run / "heatmaps" / sample.defect_type / (Path(sample.path).stem + ".png")
            save_overlay(target, sample.image, amap, lo, hi, sample.mask.numpy())
    return metrics


def _fmt(value) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """The overall metrics and the per-defect-type table as text."""
    lines = [
        f"{metrics['method']} on {metrics['category']}: image AUROC {_fmt(metrics['image_auroc'])}, "
        f"pixel AUROC {_fmt(metrics['pixel_auroc'])}, AUPRO {_fmt(metrics['aupro'])}, "
        f"image F1-max {_fmt(metrics['image_f1_max'])}, pixel F1-max {_fmt(metrics['pixel_f1_max'])}",
        f"{'defect':<16}{'images':>7}{'img AUROC':>11}{'pix AUROC':>11}{'AUPRO':>8}",
    ]
    for defect, row in metrics["per_defect"].items():
        lines.append(
            f"{defect:<16}{row['images']:>7}{_fmt(row['image_auroc']):>11}{_fmt(row['pixel_auroc']):>11}"
            f"{_fmt(row['aupro']):>8}"
        )
    return "\n".join(lines)


# -- subcommands --------------------------------------------------------------------------------
def add_info_parser(commands) -> None:
    p = commands.add_parser(
        "info", help="print the torch version, the compiled kernels and the visible devices"
    )
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from pyanomaly.info import info_text

    print(info_text())
    return 0


def add_fit_parser(commands) -> None:
    p = commands.add_parser("fit", help="train a detector on <data>/<category>/train/good")
    p.add_argument(
        "--method", default="cpcad", help=f"detector: {', '.join(sorted(METHODS))} (default cpcad)"
    )
    p.add_argument("--data", required=True, help="MVTec-AD-layout root folder")
    p.add_argument("--category", required=True, help="category folder under --data")
    p.add_argument("--out", required=True, help="run folder to write model.pt and config.json to")
    p.add_argument("--preset", help="a named configuration of the method (cpcad, anomem: paper, cpu); "
                                    "the options below override it")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any constructor argument (repeatable)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> int:
    config = preset_config(args.method, args.preset) if args.preset else {}
    config.update({
        key: value
        for key, value in (
            ("epochs", args.epochs), ("image_size", args.image_size), ("batch_size", args.batch_size),
            ("lr", args.lr), ("seed", args.seed), ("device", args.device),
        )
        if value is not None
    })
    config.update(parse_set(args.set))
    if args.quiet:
        config["verbose"] = False
    fit_run(args.method, args.data, args.category, args.out, config)
    print(f"saved {Path(args.out) / 'model.pt'} and {Path(args.out) / 'config.json'}")
    return 0


def add_evaluate_parser(commands) -> None:
    p = commands.add_parser("evaluate", help="score a run on <data>/<category>/test and write metrics")
    p.add_argument("run", help="run folder written by `pyanomaly fit`")
    p.add_argument("--data", required=True, help="MVTec-AD-layout root folder")
    p.add_argument("--category", help="default: the category the run was trained on")
    p.add_argument(
        "--eval-size", type=int, help="pixel-metric size when test images differ in size (default 256)"
    )
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_run(
        args.run, args.data, args.category, heatmaps=not args.no_heatmaps, eval_size=args.eval_size,
        device=args.device,
    )
    print(format_metrics(metrics))
    run = Path(args.run)
    print(f"wrote {run / 'metrics.json'} and {run / 'per_defect.csv'}")
    if not args.no_heatmaps:
        print(f"heatmaps: {run / 'heatmaps'}")
    return 0


def add_predict_parser(commands) -> None:
    p = commands.add_parser("predict", help="print the anomaly score and 0/1 label of images")
    p.add_argument("run", help="run folder written by `pyanomaly fit`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--heatmap-dir", help="write [image | overlay] PNGs here")
    p.add_argument("--device")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from pyanomaly.data import load_image

    run = Path(args.run)
    _run_model_path(run)
    images = []
    for name in args.images:
        if not Path(name).is_file():
            raise CLIError(f"image file not found: {name}")
        images.append(load_image(name, grayscale=True))
    detector = _load_detector(run, args.device)
    scores, maps = detector.score(images)
    for name, score in zip(args.images, scores):
        print(f"{score:.6f}\t{int(score > detector.threshold_)}\t{name}")
    if args.heatmap_dir:
        lo = float(min(m.min() for m in maps))
        hi = float(max(m.max() for m in maps))
        for name, image, amap in zip(args.images, images, maps):
            save_overlay(Path(args.heatmap_dir) / (Path(name).stem + ".png"), image, amap, lo, hi)
        print(f"heatmaps: {args.heatmap_dir}")
    return 0


def add_demo_parser(commands) -> None:
    p = commands.add_parser("demo", help="generate a small data set, train a small CPCAD on CPU, evaluate")
    p.add_argument("--out", default="pyanomaly-demo", help="output folder (data/ and run/ go here)")
    p.add_argument("--epochs", type=int, help="override the demo's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from pyanomaly.demo import run_demo

    metrics = run_demo(args.out, epochs=args.epochs, seed=args.seed)
    print(format_metrics(metrics))
    out = Path(args.out)
    print(f"data: {out / 'data'}\nrun: {out / 'run'} (model.pt, metrics.json, per_defect.csv)")
    print(f"heatmaps: {out / 'run' / 'heatmaps'}\ntotal time {metrics['total_seconds']:.0f}s")
    return 0


def add_protocol_parser(commands) -> None:
    """``pyanomaly protocol one-vs-all|ood DATA``: run an evaluation protocol, write a table."""
    p = commands.add_parser(
        "protocol",
        help="run the one-vs-all or out-of-distribution protocol on class folders and write a table",
    )
    p.add_argument("kind", choices=["one-vs-all", "ood"], help="which protocol")
    p.add_argument("data", help="class-folder dataset <data>/<split>/<class>/* (in-distribution for ood)")
    p.add_argument("--out-data", help="ood: the out-of-distribution class-folder dataset")
    p.add_argument("--out", required=True, help="table path: writes <out>.md and <out>.json")
    p.add_argument(
        "--method", default="anomem", help=f"detector: {', '.join(sorted(METHODS))} (default anomem)"
    )
    p.add_argument("--classes", nargs="+", help="one-vs-all: normal classes to run (default all)")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0], help="one-vs-all: anomaly ratios")
    p.add_argument("--train-per-class", type=int, help="one-vs-all: training images per class (default all)")
    p.add_argument("--test-per-class", type=int, help="one-vs-all: test images per class (default all)")
    p.add_argument("--train-limit", type=int, help="ood: training images (default all)")
    p.add_argument("--test-limit", type=int, help="ood: test images per dataset (default all)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--grayscale", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="subsampling and anomaly draws")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="detector argument (repeatable)")

    def run(args: argparse.Namespace) -> int:
        from pyanomaly.protocols import one_vs_all, out_of_distribution, write_table

        cls, config = get_method(args.method), parse_set(args.set)
        common = dict(
            detector=lambda: cls(**config), image_size=args.image_size, grayscale=args.grayscale,
            seed=args.seed, verbose=True,
        )
        if args.kind == "one-vs-all":
            result = one_vs_all(
                args.data, classes=args.classes, gammas=args.gammas, train_per_class=args.train_per_class,
                test_per_class=args.test_per_class, **common,
            )
        else:
            if not args.out_data:
                raise CLIError("protocol ood needs --out-data (the out-of-distribution dataset)")
            result = out_of_distribution(
                args.data, args.out_data, train_limit=args.train_limit, test_limit=args.test_limit, **common
            )
        result["method"], result["config"] = args.method, config
        md, js = write_table(result, args.out)
        print(md.read_text(), end="")
        print(f"table: {md}\njson: {js}")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyanomaly", description="Image anomaly detection (CPC-AD, AnoMem).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_info_parser, add_fit_parser, add_evaluate_parser, add_predict_parser, add_demo_parser):
        add(commands)
    add_protocol_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, NotADirectoryError, NotImplementedError, ValueError) as exc:
        if os.environ.get("PYANOMALY_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"pyanomaly {args.command}: error: {message}", file=sys.stderr)
        return 2
