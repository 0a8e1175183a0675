"""Data-parallel training (pyanomaly.distributed): 2 gloo ranks x batch b == 1 process x batch 2b."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyanomaly import AnoMem, CPCAD
from pyanomaly.demo import make_dataset
from pyanomaly.models.anomem.augment import AugmentConfig, matching_points, random_quarter_turns, simclr_view

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

CPCAD_STEP = dict(
    image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(8, 16), blocks=(1, 1),
    shared_encoder=False, prediction_steps=2, crop_fraction=2 / 3, bank_size=512, score_batch_size=8, epochs=1,
    batch_size=8, lr=1e-2, verbose=False, seed=4, device="cpu", directions=("below", "right"),
)
ANOMEM_STEP = dict(backbone="resnet18", width=8, memory_sizes=(16, 8), epochs=1, batch_size=8, image_size=32,
                   classifier_epochs=2, verbose=False, seed=2, lr=0.1, device="cpu",
                   precision="fp32")  # the global batch is under test; "auto" trains bf16 on AMX CPUs
CASES = {
    "cpcad": (CPCAD, CPCAD_STEP, {}),
    "anomem": (AnoMem, ANOMEM_STEP, {}),
    "anomem-other-images": (AnoMem, {**ANOMEM_STEP, "negatives": "other_images"}, {}),
    # labelled anomalies: the ranks hold different numbers of normal rows to recall from memory
    "anomem-semi-supervised": (AnoMem, ANOMEM_STEP, {"y": [0, 1, 0, 0, 1, 0, 0, 0]}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("ddp") / "data", n_train=8, n_test_good=2, n_test_defect=1)
    return sorted(str(p) for p in (root / "synthetic" / "train" / "good").iterdir())


def _fit_on_rank(rank: int, world: int, store: str, case: str, files: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cls, kwargs, fit_kwargs = CASES[case]
        detector = cls(**kwargs).fit(files, **fit_kwargs)
        detector.save(out if rank == 0 else out + ".rank1")  # only rank 0 writes: the second path stays absent
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_step_on_two_ranks_equals_one_process_with_the_global_batch(case, images, tmp_path):
    """One optimiser step on the 8 training images: 2 gloo ranks x 4 images (DDP, negatives and
    BatchNorm statistics of the global batch) give the parameters of 1 process x 8 images.

    Tolerance: float32 sums in another order. Some of these steps are numerically sensitive at
    initialisation (BatchNorm over near-flat synthetic images): the same single-process step with 2
    torch threads instead of 1 moves AnoMem's parameters by up to 8e-4, and computing BatchNorm's
    statistics by another, equivalent formula by as much. So each tensor may differ from the
    single-process step by 4x what the thread change moves it (and 2e-5), far below a wrong
    global batch (local negatives alone move them by 1e-2)."""
    cls, kwargs, fit_kwargs = CASES[case]
    torch.set_num_threads(2)
    noise = cls(**kwargs).fit(images, **fit_kwargs).model_.state_dict()
    torch.set_num_threads(1)
    single = cls(**kwargs).fit(images, **fit_kwargs)
    out = tmp_path / "model.pt"
    mp.start_processes(_fit_on_rank, args=(2, str(tmp_path / "store"), case, images, str(out)), nprocs=2,
                       start_method="spawn")
    assert not os.path.exists(str(out) + ".rank1")
    both = cls.load(out, device="cpu")
    assert len(both.history_) == len(single.history_)
    reference = single.model_.state_dict()
    allowed = 4 * max(float((noise[k] - v).abs().max()) for k, v in reference.items() if v.dtype.is_floating_point) + 2e-5
    for (name, a), b in zip(reference.items(), both.model_.state_dict().values()):
        if a.dtype.is_floating_point:
            assert float((b - a).abs().max()) <= allowed, (name, float((b - a).abs().max()), allowed)
        else:
            assert torch.equal(a, b), name
    np.testing.assert_allclose(both.decision_function(images[:3]), single.decision_function(images[:3]), rtol=1e-3)


def test_augmentation_draws_do_not_depend_on_how_the_batch_is_split():
    """Rows [a, b) of a batch drawn with part=(a, total) get the draws the whole batch gives them."""
    images = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    config = AugmentConfig(grayscale_p=0.5)
    whole, crop = simclr_view(images, config, torch.Generator().manual_seed(1))
    halves = [simclr_view(images[a:b], config, torch.Generator().manual_seed(1), (a, 6)) for a, b in ((0, 2), (2, 6))]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h[1].center for h in halves]), crop.center, rtol=0, atol=0)
    p1, p2 = matching_points(crop, crop, 5, torch.Generator().manual_seed(2))
    q1, _ = matching_points(halves[1][1], halves[1][1], 5, torch.Generator().manual_seed(2), (2, 6))
    torch.testing.assert_close(q1, p1[2:], rtol=0, atol=0)
    turned = random_quarter_turns(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(random_quarter_turns(images[3:], torch.Generator().manual_seed(3), (3, 6)), turned[3:])


def test_a_batch_that_does_not_split_over_the_ranks_names_batch_size(monkeypatch):
    import pyanomaly.distributed as distributed

    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    with pytest.raises(ValueError, match=r"batch_size \(8\) is the global batch: it must be a multiple of the number of ranks \(3\)"):
        CPCAD(**CPCAD_STEP).fit([np.zeros((64, 64), np.uint8)] * 8)


def test_torchrun_fit_writes_one_model_that_loads_and_scores(images, tmp_path):
    """``torchrun --nproc_per_node 2 -m pyanomaly fit``: rank 0 writes the run, it loads and scores."""
    train = Path(images[0]).parent
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pyanomaly", "fit", "--method", "cpcad", "--train", str(train), "--out", str(run), "--quiet",
               "--set", "image_size=64", "--set", "patch_size=32", "--set", "patch_stride=16", "--set", "sub_size=8",
               "--set", "sub_stride=4", "--set", "widths=[8,16]", "--set", "blocks=[1,1]", "--set", "epochs=2",
               "--set", "batch_size=4", "--set", "bank_size=256", "--set", "device=cpu", "--set", "prediction_steps=2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["config.json", "model.pt"]
    model = CPCAD.load(run / "model.pt", device="cpu")
    assert len(model.history_) == 2 and np.isfinite(model.decision_function(images[:2])).all()


class _MeanBrightness:
    """A stand-in detector (score = mean pixel value) that notes which rank fitted it."""

    def __init__(self, log: str) -> None:
        self.log = log

    def fit(self, normal, anomalies=None):
        with open(self.log, "a") as f:
            f.write(f"{dist.get_rank() if dist.is_initialized() else 0}\n")
        return self

    def decision_function(self, images):
        return images.float().mean(dim=(1, 2, 3)).numpy()


def _class_folders(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for k, name in enumerate(("a", "b", "c")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 * (k + 1), 20, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _protocol_on_rank(rank: int, world: int, store: str, root: str, log: str, out: str) -> None:
    import json

    from pyanomaly.protocols import one_vs_all

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = one_vs_all(root, detector=lambda: _MeanBrightness(log), gammas=(0.0, 0.2), seed=3)
        Path(f"{out}.{rank}").write_text(json.dumps({k: result[k] for k in ("auroc", "mean", "n_train")}))
    finally:
        dist.destroy_process_group()


def test_one_vs_all_spreads_its_fits_over_the_ranks(tmp_path):
    import json

    from pyanomaly.protocols import one_vs_all

    root = _class_folders(tmp_path / "ds")
    single = one_vs_all(root, detector=lambda: _MeanBrightness(str(tmp_path / "single.log")), gammas=(0.0, 0.2), seed=3)
    mp.start_processes(_protocol_on_rank, args=(2, str(tmp_path / "store"), str(root), str(tmp_path / "ranks.log"),
                                                str(tmp_path / "result")), nprocs=2, start_method="spawn")
    fitted_by = (tmp_path / "ranks.log").read_text().split()
    assert sorted(fitted_by) == ["0", "0", "0", "1", "1", "1"]  # 2 gammas x 3 classes, 3 fits per rank
    for rank in (0, 1):  # every rank ends with the whole table, the single-process one
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result == json.loads(json.dumps({k: single[k] for k in ("auroc", "mean", "n_train")}))
