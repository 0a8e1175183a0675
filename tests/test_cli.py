"""Tests for the command line: fit / evaluate / predict round trip, demo, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyanomaly import cli
from pyanomaly.demo import make_dataset
from pyanomaly.models.base import Detector

REPO = Path(__file__).resolve().parents[1]
TINY_SET = [
    "--set", "patch_size=32", "--set", "patch_stride=16", "--set", "sub_size=8", "--set", "sub_stride=4",
    "--set", "widths=[8, 16, 32]", "--set", "blocks=[1, 1, 1]", "--set", "shared_encoder=true",
    "--set", "prediction_steps=2", "--set", "crop_fraction=1.0", "--set", "bank_size=1024",
    "--set", "test_draws=2",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "data", n_train=8, n_test_good=3, n_test_defect=2)


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    rc = cli.main([
        "fit", "--method", "cpcad", "--data", str(data_root), "--category", "synthetic",
        "--out", str(run), "--epochs", "1", "--image-size", "64", "--seed", "0", "--quiet", *TINY_SET,
    ])
    assert rc == 0
    return run


def test_fit_writes_model_and_config(run_dir):
    assert (run_dir / "model.pt").is_file()
    record = json.loads((run_dir / "config.json").read_text())
    assert record["method"] == "cpcad" and record["category"] == "synthetic"
    assert record["config"]["widths"] == [8, 16, 32] and record["config"]["epochs"] == 1
    assert len(record["history"]) == 1
    assert isinstance(Detector.load(run_dir / "model.pt"), cli.get_method("cpcad"))


def test_evaluate_writes_metrics_table_and_heatmaps(run_dir, data_root, capsys):
    assert cli.main(["evaluate", str(run_dir), "--data", str(data_root)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_defect"]) == {"scratch", "blob", "shift"}
    assert "scratch" in out and "image AUROC" in out
    assert (run_dir / "per_defect.csv").read_text().startswith("defect,images,image_auroc")
    heatmaps = sorted((run_dir / "heatmaps").rglob("*.png"))
    assert len(heatmaps) == 3 + 3 * 2


def test_predict_prints_score_and_label(run_dir, data_root, tmp_path, capsys):
    images = sorted((data_root / "synthetic" / "test" / "blob").glob("*.png"))
    rc = cli.main(["predict", str(run_dir), *map(str, images), "--heatmap-dir", str(tmp_path / "hm")])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "path,score,label,probability"
    lines = [line for line in out if ".png," in line]
    assert len(lines) == len(images)
    for line, image in zip(lines, images):
        path, score, label, probability = line.split(",")
        assert 0.0 <= float(probability) <= 1.0 and float(score) == float(score)
        assert label in ("0", "1") and path == str(image)
    assert len(list((tmp_path / "hm").glob("*.png"))) == len(images)


class _NotYet(Detector):
    method = "notyet"

    def __init__(self, **kwargs):
        raise NotImplementedError("NotYet is not implemented yet")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--data", "{missing}", "--category", "synthetic", "--out", "{tmp}/r"],
         "data folder not found"),
        (["fit", "--data", "{data}", "--category", "nope", "--out", "{tmp}/r"], "category folder not found"),
        (["fit", "--method", "magic", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r"],
         "unknown method 'magic'"),
        (["fit", "--method", "notyet", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r"],
         "method 'notyet' is not implemented yet"),
        (["fit", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r", "--set", "colour=3"],
         "bad option for method 'cpcad'"),
        (["fit", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r", "--set", "patch_size=9"],
         "sub_size (64) must not exceed patch_size (9)"),
        (["evaluate", "{missing}", "--data", "{data}"], "run folder not found"),
        (["evaluate", "{tmp}", "--data", "{data}"], "no model.pt in run folder"),
        (["predict", "{missing}", "x.png"], "run folder not found"),
    ],
)
def test_errors_are_one_line_exit_2(argv, message, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.METHODS, "notyet", _NotYet)
    fill = {"missing": str(tmp_path / "missing"), "data": str(data_root), "tmp": str(tmp_path)}
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_predict_missing_image(run_dir, tmp_path, capsys):
    assert cli.main(["predict", str(run_dir), str(tmp_path / "nothere.png")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_anomem_registered():
    assert "anomem" in cli.METHODS and "cpcad" in cli.METHODS


def test_parse_set():
    assert cli.parse_set(["lr=1e-3", "layout=nested", "widths=[8, 16]", "shared-encoder=true"]) == {
        "lr": 1e-3, "layout": "nested", "widths": [8, 16], "shared_encoder": True,
    }


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    from pyanomaly import demo

    monkeypatch.setattr(demo, "DEMO_CONFIG", {**demo.DEMO_CONFIG, "widths": [8, 16, 32], "test_draws": 2})
    monkeypatch.setattr(demo, "make_dataset", lambda root, seed=0: make_dataset(
        root, n_train=8, n_test_good=3, n_test_defect=2, seed=seed))
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "heatmaps:" in out and "image AUROC" in out
    assert (tmp_path / "demo" / "run" / "metrics.json").is_file()
    assert any((tmp_path / "demo" / "run" / "heatmaps").rglob("*.png"))


def test_module_entry_point_error_exit_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pyanomaly", "evaluate", str(tmp_path / "none"), "--data", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "run folder not found" in proc.stderr and "Traceback" not in proc.stderr


def test_presets_build_and_the_cli_rejects_an_unknown_one(tmp_path):
    from pyanomaly import CPCAD, AnoMem
    from pyanomaly.cli import main

    for cls in (CPCAD, AnoMem):
        assert set(cls.PRESETS) == {"paper", "cpu"}
        for name in cls.PRESETS:
            detector = cls.preset(name, seed=3)
            assert detector.seed == 3
            for key, value in cls.PRESETS[name].items():
                got, want = getattr(detector, key), value
                if isinstance(got, tuple) and not isinstance(want, tuple):  # AnoMem keeps (h, w)
                    want = (want,) * len(got)
                assert got == want or tuple(got) == tuple(want), (cls.__name__, name, key)
    assert CPCAD.preset("cpu", epochs=2).epochs == 2
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        CPCAD.preset("fast")
    code = main(["fit", "--data", str(tmp_path), "--category", "x", "--out", str(tmp_path / "r"), "--preset", "nope"])
    assert code == 2


# -- the surface of issue 13: version, generated options, plain folders, colour, JSON, benchmark ----
ANOMEM_FAST = ["--backbone", "resnet18", "--width", "8", "--memory-sizes", "[16, 8]", "--epochs", "1",
               "--batch-size", "8", "--image-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def colour_folders(tmp_path_factory):
    """train/ (normal colour images) and test/good, test/bad (no masks) as plain folders."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for folder, count, bad in (("train", 12, False), ("test/good", 4, False), ("test/bad", 4, True)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            image = np.clip(rng.normal([200, 60, 40], 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            if bad:
                image[8:20, 8:20] = (20, 220, 30)
            Image.fromarray(image).save(root / folder / f"{i:02d}.png")
    return root


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    import pyanomaly

    assert capsys.readouterr().out.strip() == f"pyanomaly {pyanomaly.__version__}"


@pytest.mark.parametrize("method", ["cpcad", "anomem"])
def test_fit_help_lists_every_option_with_its_default(method, capsys):
    import inspect

    with pytest.raises(SystemExit):
        cli.main(["fit", "--method", method, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cls = cli.get_method(method)
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "(default: 768)" in text if method == "cpcad" else "(default: resnet50)" in text


def test_colour_anomem_through_the_cli(colour_folders, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["fit", "--method", "anomem", "--train", str(colour_folders / "train"), "--out", str(run),
                     *ANOMEM_FAST]) == 0
    detector = Detector.load(run / "model.pt")
    assert detector.in_channels_ == 3  # colour kept: gray is not hard-coded any more
    record = json.loads((run / "config.json").read_text())
    assert record["pyanomaly_version"] and record["torch_version"] and record["train"]
    # evaluate a plain folder without masks: image-level metrics only, into its own subfolder
    assert cli.main(["evaluate", str(run), "--test", str(colour_folders / "test")]) == 0
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["pixel_auroc"] is None
    assert set(metrics["per_defect"]) == {"bad"}
    capsys.readouterr()
    # predict on a folder, JSON rows, masks and .npy maps
    assert cli.main(["predict", str(run), str(colour_folders / "test"), "--format", "json",
                     "--mask-dir", str(tmp_path / "masks"), "--map-dir", str(tmp_path / "maps")]) == 1 - 1
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8 and {"path", "score", "label", "probability"} == set(rows[0])
    assert sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.npy"))[:2] == [
        "bad/00.npy", "bad/01.npy"]
    assert len(list((tmp_path / "masks").rglob("*.png"))) == 8


def test_config_file_round_trip(run_dir, data_root, tmp_path):
    """The config.json that fit writes can be fed back with --config (and options override it)."""
    out = tmp_path / "again"
    assert cli.main(["fit", "--data", str(data_root), "--category", "synthetic", "--out", str(out),
                     "--config", str(run_dir / "config.json"), "--test-draws", "1", "--quiet"]) == 0
    first = json.loads((run_dir / "config.json").read_text())["config"]
    second = json.loads((out / "config.json").read_text())["config"]
    assert second == {**first, "test_draws": 1}


def test_benchmark_over_two_categories(data_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    for name in ("a", "b"):
        shutil.copytree(data_root / "synthetic", root / name)
    out = tmp_path / "bench"
    assert cli.main(["benchmark", "--data", str(root), "--categories", "a,b", "--out", str(out), "--epochs", "1",
                     "--image-size", "64", *TINY_SET, "--quiet"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    assert [r["category"] for r in result["rows"]] == ["a", "b"]
    assert (out / "benchmark.md").read_text().count("|") > 10 and "**mean**" in capsys.readouterr().out
    assert (out / "a" / "model.pt").is_file() and (out / "b" / "metrics.json").is_file()


# -- issue 14: nothing a user saved is lost; every check before the work ---------------------------
def _no_training(monkeypatch):
    """Make any fit fail loudly: a check that should come first must not reach training."""
    from pyanomaly.models.cpcad import CPCAD

    def fit(*args, **kwargs):
        raise AssertionError("training started before the check")

    monkeypatch.setattr(CPCAD, "fit", fit)


@pytest.mark.parametrize(
    "out, message",
    [("{tmp}/afile", "is a file, not a run folder"), ("", "--out is empty"), (".", "is the current folder"),
     ("{run}", "already holds a run (model.pt, config.json")],
)
def test_out_is_checked_before_training(out, message, data_root, run_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    _no_training(monkeypatch)
    argv = ["fit", "--data", str(data_root), "--category", "synthetic", "--out",
            out.format(tmp=tmp_path, run=run_dir), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unwritable_out_is_refused_before_training(data_root, tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    _no_training(monkeypatch)
    assert cli.main(["fit", "--data", str(data_root), "--category", "synthetic", "--out", str(locked / "r")]) == 2
    assert "cannot create run folder" in capsys.readouterr().err


def test_overwrite_clears_the_old_run(run_dir, data_root, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "metrics.json").write_text('{"method": "anomem"}')  # another run's stale output
    (run / "notes.txt").write_text("mine")  # the user's own file
    assert cli.main(["fit", "--data", str(data_root), "--category", "synthetic", "--out", str(run), "--overwrite",
                     "--epochs", "1", "--image-size", "64", "--quiet", *TINY_SET]) == 0
    assert not (run / "metrics.json").exists() and (run / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_while_the_folder_is_locked(run_dir, data_root, tmp_path, capsys):
    """Two processes on one run folder: the second gets a one-line message (the lock holds a live pid)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / ".pyanomaly.lock").write_text(str(holder.pid))
        assert cli.main(["evaluate", str(run), "--data", str(data_root)]) == 2
        assert f"in use by another pyanomaly process (pid {holder.pid})" in capsys.readouterr().err
        assert cli.main(["fit", "--data", str(data_root), "--category", "synthetic", "--out", str(run),
                         "--overwrite", "--quiet"]) == 2
        assert "in use by another pyanomaly process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # a lock left by a dead process is taken over
    assert cli.main(["evaluate", str(run), "--data", str(data_root), "--no-heatmaps"]) == 0
    assert not (run / ".pyanomaly.lock").exists()


LOCK_RACER = """
import os, sys, time
from pathlib import Path
from pyanomaly.runs import RunError, _locked
folder = Path(sys.argv[1])
while not (folder / "go").exists():
    time.sleep(0.001)
try:
    with _locked(folder):
        try:
            os.close(os.open(folder / "holder", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            sys.exit(3)  # two processes inside the lock at once
        time.sleep(0.2)
        os.unlink(folder / "holder")
except RunError:
    sys.exit(2)
"""


def test_an_empty_lock_counts_as_held_until_it_is_old(tmp_path):
    """An empty lock may be one whose owner has not written its pid yet: taking it over at once let
    two concurrent fits both train into one folder. Only an old empty lock is stale."""
    from pyanomaly.runs import FRESH_EMPTY_LOCK_SECONDS, RunError, _locked

    lock = tmp_path / ".pyanomaly.lock"
    lock.write_text("")
    with pytest.raises(RunError, match="in use by another pyanomaly process"):
        with _locked(tmp_path):
            pass
    old = time.time() - 2 * FRESH_EMPTY_LOCK_SECONDS
    os.utime(lock, (old, old))
    with _locked(tmp_path):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists()


@pytest.mark.parametrize("stale", [False, True])
def test_processes_racing_for_one_lock_never_both_get_it(tmp_path, stale):
    """Released together on an unlocked (or stale-locked) folder: one holds the lock at a time, none crashes."""
    if stale:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (tmp_path / ".pyanomaly.lock").write_text(str(dead.pid))
    procs = [subprocess.Popen([sys.executable, "-c", LOCK_RACER, str(tmp_path)], stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    time.sleep(3)  # let every racer import and wait at the gate
    (tmp_path / "go").touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {0, 2} and codes.count(0) >= 1, results
    assert not (tmp_path / ".pyanomaly.lock").exists()
    assert not list(tmp_path.glob(".pyanomaly.lock.*"))  # no private or set-aside files left behind


def test_two_concurrent_fits_into_one_folder(data_root, tmp_path):
    """Started together: exactly one trains and saves; the other stops with the lock message."""
    out = tmp_path / "shared"
    argv = [sys.executable, "-m", "pyanomaly", "fit", "--data", str(data_root), "--category", "synthetic",
            "--out", str(out), "--epochs", "3", "--image-size", "64", "--quiet", *TINY_SET]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert "in use by another pyanomaly process" in loser[1] or "already holds a run" in loser[1]
    Detector.load(out / "model.pt")


def test_evaluating_another_category_writes_its_own_subfolder(run_dir, data_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "synthetic", root / "other")
    assert cli.main(["evaluate", str(run_dir), "--data", str(root), "--category", "other", "--no-heatmaps"]) == 0
    assert (run_dir / "eval" / "other" / "metrics.json").is_file()
    assert json.loads((run_dir / "eval" / "other" / "metrics.json").read_text())["category"] == "other"


def test_predict_heatmaps_do_not_collide_and_dirs_are_checked_first(run_dir, data_root, tmp_path, capsys):
    a = data_root / "synthetic" / "test" / "blob" / "000.png"
    b = data_root / "synthetic" / "test" / "scratch" / "000.png"
    assert cli.main(["predict", str(run_dir), str(a), str(b), "--heatmap-dir", str(tmp_path / "hm")]) == 0
    assert len(list((tmp_path / "hm").glob("*.png"))) == 2  # same file name, two heatmaps
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert cli.main(["predict", str(run_dir), str(a), "--heatmap-dir", str(tmp_path / "file")]) == 2
    assert "--heatmap-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "{run}", "--data", "{data}", "--eval-size", "-5"], "--eval-size must be a positive number"),
        (["evaluate", "{run}", "--data", "{data}", "--eval-size", "0"], "--eval-size must be a positive number"),
        (["fit", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r", "--epochs", "0"],
         "epochs must be >= 1"),
        (["fit", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r", "--set", "widths=abc"],
         "widths must be a non-empty list of positive ints"),
        (["fit", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r", "--device", "gpu"],
         "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        (["fit", "--method", "anomem", "--data", "{data}", "--category", "synthetic", "--out", "{tmp}/r",
          "--set", "device=cuda:5"], "cuda:5"),
        (["predict", "{run}", "{data}/synthetic/test/blob/000.png", "--device", "gpu"], "device must be"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, run_dir, data_root, tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    fill = {"run": str(run_dir), "data": str(data_root), "tmp": str(tmp_path)}
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing claimed


def test_cuda_on_a_cpu_torch_is_one_line(data_root, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for method in ("cpcad", "anomem"):
        assert cli.main(["fit", "--method", method, "--data", str(data_root), "--category", "synthetic",
                         "--out", str(tmp_path / method), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "CUDA requested" in err and "use device 'cpu' or 'auto'" in err and len(err.splitlines()) == 1


def test_small_image_is_named_by_its_file(data_root, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (64, 64), 128).save(folder / f"{i}.png")
    Image.new("L", (6, 64), 128).save(folder / "tiny.png")
    assert cli.main(["fit", "--train", str(folder), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tiny.png is 64x6 pixels; this detector needs at least 64 px a side" in err


def test_ctrl_c_during_training_says_nothing_was_saved(data_root, tmp_path, capsys, monkeypatch):
    from pyanomaly.models.cpcad import CPCAD

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CPCAD, "fit", interrupted)
    assert cli.main(["fit", "--data", str(data_root), "--category", "synthetic", "--out", str(tmp_path / "r")]) == 2
    assert "interrupted: nothing was saved to" in capsys.readouterr().err
    assert not (tmp_path / "r" / ".pyanomaly.lock").exists()


def test_a_mask_that_marks_most_of_the_image_warns_once(tmp_path):
    import numpy as np
    from PIL import Image

    from pyanomaly.data import load_mask

    values = np.full((32, 32), 3, np.uint8)  # background 3, not 0
    values[10:14, 10:14] = 255
    Image.fromarray(values).save(tmp_path / "m.png")
    with pytest.warns(UserWarning, match=r"m.png marks 100% of the image as defect: every pixel > 0 counts, and it holds values \[3, 255\]"):
        assert load_mask(tmp_path / "m.png").all()
