"""Command line: ``pyanomaly info | fit | evaluate | predict | export | benchmark | demo | protocol``.

    pyanomaly fit --method cpcad (--data ROOT --category C | --train DIR) --out RUN [--preset cpu]
                  [--config run.json] [--epochs N ...every constructor argument...] [--overwrite]
    pyanomaly evaluate RUN (--data ROOT [--category C] | --test DIR)
    pyanomaly predict RUN|MODEL IMAGE|FOLDER|GLOB... [--format csv|json] [--output F]
                  [--heatmap-dir D] [--mask-dir D] [--map-dir D]
    pyanomaly export RUN [--format onnx|torch] [--out FILE]
    pyanomaly benchmark --method M --data ROOT --categories all|a,b --out DIR
    pyanomaly demo [--out DIR]

This module only parses arguments and calls :mod:`pyanomaly.runs`. A method's options are generated
from its constructor (names, defaults and the docstring's text), so ``fit --method anomem --help``
lists every AnoMem argument. Expected failures (a missing folder, a bad option, no GPU) print one line
and exit with status 2; set PYANOMALY_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyanomaly.models.base import METHODS, get_method as _get_method
from pyanomaly.runs import RunError

__all__ = ["METHODS", "CLIError", "build_parser", "get_method", "main", "parse_set"]

CLIError = RunError  # one exception type for expected failures, whichever layer raises it


def get_method(name: str):
    """The detector class registered as ``name`` (CLIError naming the choices if none)."""
    try:
        return _get_method(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are parsed as JSON when possible (1e-3, true, [1, 2])."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
        out[key] = _json_or_text(value)
    return out


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def preset_config(method: str, name: str) -> dict[str, Any]:
    """The constructor arguments of ``method``'s preset ``name`` (CLIError when there is none)."""
    try:
        return get_method(method).preset_arguments(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def config_file(path: str) -> dict[str, Any]:
    """Constructor arguments from a JSON file: a flat ``{argument: value}`` or a run's config.json
    (its ``"config"``)."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--config file not found: {path}")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CLIError(f"--config {path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CLIError(f"--config {path} must hold a JSON object of constructor arguments")
    return dict(record.get("config", record))


# -- options generated from a constructor -----------------------------------------------------------
def _parameter_help(cls) -> dict[str, str]:
    """``argument -> first sentence of its text`` from the class docstring's ``Args:`` section."""
    doc = inspect.getdoc(cls) or ""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    section = re.split(r"\n\S", section, maxsplit=1)[0]
    helps: dict[str, str] = {}
    for match in re.finditer(r"^    ([a-z_][a-z0-9_, ]*):\s*(.*(?:\n {8}.*)*)", section, flags=re.M):
        text = " ".join(match.group(2).split())
        sentence = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0]
        for name in match.group(1).split(","):
            helps[name.strip()] = sentence.replace("%", "%%")
    return helps


def add_method_options(parser: argparse.ArgumentParser, cls) -> list[str]:
    """One ``--option`` per constructor argument of ``cls`` (absent unless given); returns the names."""
    group = parser.add_argument_group(f"{cls.__name__} options (defaults shown; JSON for lists, null for None)")
    helps = _parameter_help(cls)
    names = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind not in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            continue
        default = param.default
        flag = "--" + name.replace("_", "-")
        text = f"{helps.get(name, '')} (default: {json.dumps(default) if not isinstance(default, str) else default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif isinstance(default, int):
            group.add_argument(flag, dest=name, type=_typed(int, flag), default=argparse.SUPPRESS, metavar="INT", help=text)
        elif isinstance(default, float):
            group.add_argument(flag, dest=name, type=_typed(float, flag), default=argparse.SUPPRESS, metavar="X", help=text)
        elif isinstance(default, str):
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="TEXT", help=text)
        else:
            group.add_argument(flag, dest=name, type=_json_or_text, default=argparse.SUPPRESS, metavar="JSON", help=text)
        names.append(name)
    return names


def _typed(kind, flag: str):
    def convert(text: str):
        if text.lower() in ("null", "none"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {'an integer' if kind is int else 'a number'}, got {text!r}")
    return convert


def _method_in(argv: Sequence[str], default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return default


def _detector_config(args: argparse.Namespace, method: str, names: Sequence[str]) -> dict[str, Any]:
    """preset < --config file < explicit options < --set."""
    config = preset_config(method, args.preset) if args.preset else {}
    if args.config:
        config.update(config_file(args.config))
    config.update({name: getattr(args, name) for name in names if hasattr(args, name)})
    config.update(parse_set(args.set))
    if getattr(args, "quiet", False):
        config["verbose"] = False
    known = set(inspect.signature(get_method(method).__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CLIError(f"bad option for method {method!r}: unknown argument(s) {', '.join(unknown)}")
    return config


def _add_common_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a named configuration of the method (paper, cpu); options below override it")
    p.add_argument("--config", help="JSON file of constructor arguments (a run's config.json works)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any constructor argument (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch log lines")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in the output folder")


# -- subcommands --------------------------------------------------------------------------------
def add_info_parser(commands, argv) -> None:
    p = commands.add_parser("info", help="print the torch version, the compiled kernels and the visible devices")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from pyanomaly.info import info_text

    print(info_text())
    return 0


def add_fit_parser(commands, argv) -> None:
    method = _method_in(argv, "cpcad")
    p = commands.add_parser(
        "fit", help="train a detector on normal images (MVTec layout or a plain folder)",
        description="Train a detector. Options are the method's constructor arguments; "
                    "`pyanomaly fit --method anomem --help` lists AnoMem's.",
    )
    p.add_argument("--method", default="cpcad", help=f"detector: {', '.join(sorted(METHODS))} (default cpcad)")
    p.add_argument("--data", help="MVTec-AD-layout root folder (with --category)")
    p.add_argument("--category", help="category folder under --data")
    p.add_argument("--train", help="a plain folder (or glob) of normal training images, instead of --data")
    p.add_argument("--out", help="run folder to write model.pt and config.json to")
    p.add_argument("--resume", metavar="RUN", help="continue the checkpointed fit in RUN (fit with --checkpoint-every N)")
    _add_common_config(p)
    names = add_method_options(p, get_method(method)) if method in METHODS else []
    p.set_defaults(func=cmd_fit, method_options=names)


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit and save a run; under ``torchrun --nproc_per_node N`` one model over N ranks (rank 0 writes)."""
    from pyanomaly import distributed
    from pyanomaly.runs import fit_run

    if args.resume is not None:
        if args.out not in (None, args.resume) or args.data or args.train:
            raise CLIError("--resume RUN takes its data and output folder from RUN; drop --out/--data/--train")
        config = {name: getattr(args, name) for name in args.method_options if hasattr(args, name)}
        distributed.init_from_env(config.get("device", "auto"))
        fit_run(args.method, args.resume, config, resume=True)
        out = Path(args.resume)
    else:
        if args.out is None:
            raise CLIError("fit needs --out RUN (the run folder to write)")
        config = _detector_config(args, args.method, args.method_options)
        distributed.init_from_env(config.get("device", "auto"))
        fit_run(args.method, args.out, config, data=args.data, category=args.category, train=args.train,
                overwrite=args.overwrite)
        out = Path(args.out)
    if distributed.is_main():
        print(f"saved {out / 'model.pt'} and {out / 'config.json'}")
    distributed.shutdown()
    return 0


def add_evaluate_parser(commands, argv) -> None:
    p = commands.add_parser("evaluate", help="score a run on a test set and write metrics (and heatmaps)")
    p.add_argument("run", help="run folder written by `pyanomaly fit`")
    p.add_argument("--data", help="MVTec-AD-layout root folder")
    p.add_argument("--category", help="default: the category the run was trained on")
    p.add_argument("--test", help="a plain folder with good/ and defect subfolders (masks optional), instead of --data")
    p.add_argument("--eval-size", type=int, help="pixel-metric size when test images differ in size (default 256)")
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pyanomaly.runs import evaluate_run

    metrics = evaluate_run(args.run, data=args.data, category=args.category, test=args.test,
                           heatmaps=not args.no_heatmaps, eval_size=args.eval_size, device=args.device)
    print(format_metrics(metrics))
    target = Path(metrics["output_folder"])
    print(f"wrote {target / 'metrics.json'} and {target / 'per_defect.csv'}")
    if not args.no_heatmaps:
        print(f"heatmaps: {target / 'heatmaps'}")
    return 0


def add_predict_parser(commands, argv) -> None:
    p = commands.add_parser("predict", help="score images: CSV (with a header) or JSON rows, optional heatmaps and masks")
    p.add_argument("run", help="run folder written by `pyanomaly fit`, a model.pt, or an exported .onnx / .pt2")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--format", default="csv", choices=["csv", "json"], help="output format (default csv)")
    p.add_argument("--output", help="write the rows to this file instead of stdout")
    p.add_argument("--heatmap-dir", help="write [image | overlay] PNGs here")
    p.add_argument("--mask-dir", help="write predicted defect masks (map > pixel threshold) as PNGs here")
    p.add_argument("--map-dir", help="write the raw anomaly maps as .npy files here")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from pyanomaly.runs import format_rows, predict_run

    rows = predict_run(args.run, args.images, output=args.output, fmt=args.format, heatmap_dir=args.heatmap_dir,
                       mask_dir=args.mask_dir, map_dir=args.map_dir, device=args.device)
    if args.output is None:
        print(format_rows(rows, args.format))
    else:
        print(f"wrote {len(rows)} rows to {args.output}")
    return 0


def add_export_parser(commands, argv) -> None:
    p = commands.add_parser("export", help="write a fitted run as one ONNX or torch.export graph (for deployment)")
    p.add_argument("run", help="run folder written by `pyanomaly fit`, or a model.pt")
    p.add_argument("--format", default="onnx", choices=["onnx", "torch"], help="onnx (default; needs the export extra) or torch")
    p.add_argument("--out", help="file to write (default: RUN/model.onnx or RUN/model.pt2)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pyanomaly.runs import export_run

    path = export_run(args.run, args.format, args.out)
    print(f"wrote {path}")
    return 0


def add_benchmark_parser(commands, argv) -> None:
    method = _method_in(argv, "cpcad")
    p = commands.add_parser("benchmark", help="fit and evaluate on several MVTec categories; one table")
    p.add_argument("--method", default="cpcad", help=f"detector: {', '.join(sorted(METHODS))} (default cpcad)")
    p.add_argument("--data", required=True, help="MVTec-AD-layout root folder")
    p.add_argument("--categories", default="all", help="'all' or comma-separated category names (default all)")
    p.add_argument("--out", required=True, help="folder: one run per category, benchmark.md and benchmark.json")
    p.add_argument("--heatmaps", action="store_true", help="also write heatmaps per category")
    _add_common_config(p)
    names = add_method_options(p, get_method(method)) if method in METHODS else []
    p.set_defaults(func=cmd_benchmark, method_options=names)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from pyanomaly.runs import benchmark_run

    config = _detector_config(args, args.method, args.method_options)
    categories = "all" if args.categories == "all" else [c for c in args.categories.split(",") if c]
    result = benchmark_run(args.method, args.data, categories, args.out, config, overwrite=args.overwrite,
                           heatmaps=args.heatmaps)
    print(result["table"])
    print(f"table: {Path(args.out) / 'benchmark.md'}\njson: {Path(args.out) / 'benchmark.json'}")
    return 0


def add_demo_parser(commands, argv) -> None:
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


def add_protocol_parser(commands, argv) -> None:
    """``pyanomaly protocol one-vs-all|ood DATA``: run an evaluation protocol, write a table."""
    p = commands.add_parser(
        "protocol", help="run the one-vs-all or out-of-distribution protocol on class folders and write a table",
    )
    p.add_argument("kind", choices=["one-vs-all", "ood"], help="which protocol")
    p.add_argument("data", help="class-folder dataset <data>/<split>/<class>/* (in-distribution for ood)")
    p.add_argument("--out-data", help="ood: the out-of-distribution class-folder dataset")
    p.add_argument("--out", required=True, help="table path: writes <out>.md and <out>.json")
    p.add_argument("--method", default="anomem", help=f"detector: {', '.join(sorted(METHODS))} (default anomem)")
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
    p.set_defaults(func=cmd_protocol)


def cmd_protocol(args: argparse.Namespace) -> int:
    """Run a protocol; under ``torchrun`` the one-vs-all fits are spread over the ranks (the OOD
    protocol's single fit trains over all of them) and rank 0 writes the table."""
    from pyanomaly import distributed
    from pyanomaly.protocols import one_vs_all, out_of_distribution, write_table

    cls, config = get_method(args.method), parse_set(args.set)
    distributed.init_from_env(config.get("device", "auto"))
    common = dict(detector=lambda: cls(**config), image_size=args.image_size, grayscale=args.grayscale,
                  seed=args.seed, verbose=True)
    if args.kind == "one-vs-all":
        result = one_vs_all(args.data, classes=args.classes, gammas=args.gammas, train_per_class=args.train_per_class,
                            test_per_class=args.test_per_class, **common)
    else:
        if not args.out_data:
            raise CLIError("protocol ood needs --out-data (the out-of-distribution dataset)")
        result = out_of_distribution(args.data, args.out_data, train_limit=args.train_limit,
                                     test_limit=args.test_limit, **common)
    result["method"], result["config"] = args.method, config
    main = distributed.is_main()
    distributed.shutdown()
    if not main:
        return 0
    md, js = write_table(result, args.out)
    print(md.read_text(), end="")
    print(f"table: {md}\njson: {js}")
    return 0


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


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; ``argv`` picks the method whose options ``fit`` and ``benchmark`` list."""
    import pyanomaly

    parser = argparse.ArgumentParser(prog="pyanomaly", description="Image anomaly detection (CPC-AD, AnoMem).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pyanomaly {pyanomaly.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_info_parser, add_fit_parser, add_evaluate_parser, add_predict_parser, add_export_parser,
                add_benchmark_parser, add_demo_parser, add_protocol_parser):
        add(commands, argv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    if not getattr(args, "quiet", False):
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (CLIError, OSError, ImportError, NotImplementedError, ValueError, RuntimeError, TypeError,
            ArithmeticError) as exc:
        if os.environ.get("PYANOMALY_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, NotImplementedError) and "not implemented" not in message:
            message = f"not implemented yet ({message})"
        print(f"pyanomaly {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyanomaly {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
