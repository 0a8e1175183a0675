"""Tests for AnoMem: ResNet encoders, augmentations, memory layers, the detector and the protocols."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyanomaly.ops
from pyanomaly import AnoMem
from pyanomaly.metrics import image_auroc
from pyanomaly.models.anomem.augment import (
    AugmentConfig, all_quarter_turns, matching_points, random_quarter_turns, simclr_view,
)
from pyanomaly.models.anomem.torch_model import AnoMemModel, double_hinge_loss, nt_xent
from pyanomaly.models.base import Detector
from pyanomaly.nn import HopfieldMemory
from pyanomaly.nn.resnet import resnet18, resnet50
from pyanomaly.protocols import one_vs_all, out_of_distribution, write_table

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10-jpg.tar.gz"

# A tiny configuration: fits 96 images of 32x32 in a few seconds on one CPU thread.
TINY = dict(
    backbone="resnet18",
    width=8,
    memory_sizes=(32, 16),
    beta=0.05,
    epochs=3,
    batch_size=32,
    lr=0.05,
    classifier_epochs=30,
    classifier_hidden=32,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n: int, anomalous: bool, seed: int, size: int = 32) -> torch.Tensor:
    """Normal: smooth coloured blobs. Anomalous: the same with fine stripes over the whole image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = torch.zeros(n, 3, size, size)
    for _ in range(3):
        cy, cx = torch.rand(2, n, 1, 1, generator=g) * size
        radius = 3 + 5 * torch.rand(n, 1, 1, generator=g)
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        img = img + blob[:, None] * torch.rand(n, 3, 1, 1, generator=g)
    img = 0.1 + 0.8 * img.clamp(0, 1)
    if anomalous:
        period = 2 + torch.randint(0, 3, (n, 1, 1), generator=g).float()
        vertical = torch.rand(n, 1, 1, generator=g) < 0.5
        coord = torch.where(vertical, xx, yy)
        img = img + 0.25 * (((coord / period).floor() % 2) * 2 - 1)[:, None]
    img = img + 0.02 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def data():
    test = torch.cat([synthetic(48, False, 1), synthetic(48, True, 2)])
    labels = np.r_[np.zeros(48), np.ones(48)].astype(np.int64)
    normal, anomalies = synthetic(96, False, 0), synthetic(8, True, 3)
    return {"normal": normal, "anomalies": anomalies, "test": test, "labels": labels}


@pytest.fixture(scope="module")
def one_class(data):
    torch.set_num_threads(1)
    return AnoMem(**TINY).fit(data["normal"])


@pytest.fixture(scope="module")
def semi_supervised(data):
    torch.set_num_threads(1)
    return AnoMem(**TINY).fit(data["normal"], anomalies=data["anomalies"])


# -- encoders --------------------------------------------------------------------------------------
def test_resnet_parameter_counts_match_the_standard_networks():
    # torchvision's resnet18 / resnet50 without the final fc layer
    assert sum(p.numel() for p in resnet18().parameters()) == 11_176_512
    assert sum(p.numel() for p in resnet50().parameters()) == 23_508_032


@pytest.mark.parametrize(
    ("factory", "small", "size", "channels", "sides"),
    [
        (resnet18, True, 32, [16, 32, 64, 128], [32, 16, 8, 4]),
        (resnet50, False, 64, [64, 128, 256, 512], [16, 8, 4, 2]),
    ],
)
def test_resnet_stage_outputs(factory, small, size, channels, sides):
    net = factory(width=16, small_input=small).eval()
    outs = net(torch.rand(2, 3, size, size))
    assert [o.shape[1] for o in outs] == channels == net.stage_channels
    assert [o.shape[-1] for o in outs] == sides
    assert len(net(torch.rand(2, 3, size, size), num_stages=3)) == 3


# -- augmentations ---------------------------------------------------------------------------------
def test_augment_is_batchwise_reproducible_and_in_range():
    images = torch.rand(6, 3, 32, 32)
    first, crop1 = simclr_view(images, AugmentConfig(), torch.Generator().manual_seed(0))
    again, _ = simclr_view(images, AugmentConfig(), torch.Generator().manual_seed(0))
    other, _ = simclr_view(images, AugmentConfig(), torch.Generator().manual_seed(1))
    assert first.shape == images.shape and torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    assert crop1.half.shape == (6, 2) and bool((crop1.half > 0).all()) and bool((crop1.half <= 1).all())


def test_matching_points_land_on_the_same_source_pixels():
    # crop only: views of a coordinate image; the points must read back the same source coordinate
    config = AugmentConfig(jitter_p=0, blur_p=0, noise_p=0, crop_scale=(0.5, 1.0))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    source = torch.stack([xx, yy, 0.5 * torch.ones_like(xx)])[None].repeat(8, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    v1, c1 = simclr_view(source, config, gen)
    v2, c2 = simclr_view(source, config, gen)
    p1, p2 = matching_points(c1, c2, 20, gen)
    high = torch.minimum(c1.center + c1.half, c2.center + c2.half)
    overlap = (high > torch.maximum(c1.center - c1.half, c2.center - c2.half)).all(-1)

    def read(view, points):
        return F.grid_sample(view, points[:, :, None], padding_mode="border", align_corners=False)[..., 0]

    diff = (read(v1, p1) - read(v2, p2))[:, :2].abs().amax(dim=(1, 2))
    assert bool(overlap.any())
    assert float(diff[overlap].max()) < 0.03


# -- memory layers use the Hopfield op -------------------------------------------------------------
def test_memory_layers_are_normalised_hopfield_memories():
    model = AnoMemModel(
        backbone="resnet18", in_channels=3, width=8, small_input=True, scales=(3, 4), memory_sizes=(16, 8),
        beta=None, hopfield_iters=2, hopfield_tol=1e-4, projection_dim=None, classifier_pool=2,
        classifier_hidden=8,
    )
    for memory, (size, dim) in zip(model.memories, [(16, 32), (8, 64)]):
        assert isinstance(memory, HopfieldMemory) and memory.normalize
        assert memory.patterns.shape == (size, dim) and memory.beta == pytest.approx(dim**-0.5)
        assert memory.max_iter == 2
    # the parameter names saved models hold (unchanged since the first release of AnoMem)
    names = {k for k in model.state_dict() if k.startswith("memories.0.")}
    assert names == {
        "memories.0.patterns", "memories.0.state_norm.weight", "memories.0.state_norm.bias",
        "memories.0.pattern_norm.weight", "memories.0.pattern_norm.bias",
    }


def test_memory_layers_call_the_hopfield_op(monkeypatch, data):
    calls = []
    original = pyanomaly.ops.hopfield_retrieve

    def counting(queries, memory, **kwargs):
        calls.append((tuple(queries.shape), tuple(memory.shape), kwargs))
        return original(queries, memory, **kwargs)

    monkeypatch.setattr(pyanomaly.ops, "hopfield_retrieve", counting)
    detector = AnoMem(**{**TINY, "epochs": 1}).fit(data["normal"][:32])
    trained = len(calls)
    assert trained >= 2  # stage 1: both scales of the one batch (and again for the training scores)
    detector.decision_function(data["test"][:4])
    assert len(calls) == trained + 2  # one call per scale when scoring
    # stage 3 map of a 32 px image with the CIFAR stem: 8x8, stage 4: 4x4 positions per image
    assert calls[-2][0] == (4 * 8 * 8, 32) and calls[-2][1] == (32, 32)
    assert calls[-1][0] == (4 * 4 * 4, 64) and calls[-1][1] == (16, 64)
    assert calls[-1][2]["beta"] == 0.05 and calls[-1][2]["max_iter"] == 3

    # the op's output is what the scores are made of: with a zero recollection, D is the normalised
    # features themselves and the scores change
    trained_scores = detector.scale_scores(data["test"][:4])
    monkeypatch.setattr(
        pyanomaly.ops,
        "hopfield_retrieve",
        lambda q, m, **k: (torch.zeros_like(q), torch.zeros(q.shape[0], dtype=torch.int32)),
    )
    assert not np.allclose(detector.scale_scores(data["test"][:4]), trained_scores)


def test_memory_gradients_reach_patterns_and_encoder():
    model = AnoMemModel(
        backbone="resnet18", in_channels=3, width=8, small_input=True, scales=(3, 4), memory_sizes=(16, 8),
        beta=None, hopfield_iters=2, hopfield_tol=1e-4, projection_dim=None, classifier_pool=2,
        classifier_hidden=8,
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    v1, c1 = simclr_view(x, AugmentConfig(), gen)
    v2, c2 = simclr_view(x, AugmentConfig(), gen)
    kwargs = dict(sampling_ratios=(0.25, 1.0), scale_weights=(0.5, 1.0), temperature=0.5, variance_weight=1.0)
    is_normal = torch.tensor([True, True, False, True])
    state = gen.get_state()
    other_images, _ = model.contrastive_loss(
        v1, c1, v2, c2, is_normal, **kwargs, generator=gen, negatives="other_images"
    )
    gen.set_state(state)
    loss, parts = model.contrastive_loss(v1, c1, v2, c2, is_normal, **kwargs, generator=gen)
    assert float(other_images.detach()) < float(loss.detach())  # the same points, fewer negatives
    loss.backward()
    assert parts["variance"] > 0
    assert all(float(m.patterns.grad.abs().sum()) > 0 for m in model.memories)
    assert float(model.encoder.layer1[0].conv1.weight.grad.abs().sum()) > 0
    # train_encoder=False: the same loss value, gradients for the memories only
    model.zero_grad(set_to_none=True)
    gen.set_state(state)
    frozen, _ = model.contrastive_loss(v1, c1, v2, c2, is_normal, **kwargs, generator=gen, train_encoder=False)
    torch.testing.assert_close(frozen, loss)
    frozen.backward()
    assert all(float(m.patterns.grad.abs().sum()) > 0 for m in model.memories)
    assert all(p.grad is None for p in model.encoder.parameters())


def _nt_xent_loop(first, second, temperature, groups):
    """NT-Xent written anchor by anchor: the negatives are the other rows outside the anchor's group."""
    z = torch.nn.functional.normalize(torch.cat([first, second]).double(), dim=-1)
    n = first.shape[0]
    both = torch.cat([groups, groups])
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        allowed = [j for j in range(2 * n) if j == positive or both[j] != both[i]]
        logits = torch.stack([z[i] @ z[j] for j in allowed]) / temperature
        losses.append(torch.logsumexp(logits, 0) - z[i] @ z[positive] / temperature)
    return torch.stack(losses).mean()


def test_nt_xent_groups_leave_the_same_images_vectors_out_of_the_negatives():
    torch.manual_seed(0)
    first, second = torch.randn(6, 5), torch.randn(6, 5)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    expected = _nt_xent_loop(first, second, 0.5, groups)
    torch.testing.assert_close(nt_xent(first, second, 0.5, groups).double(), expected, rtol=1e-5, atol=1e-6)
    # one vector per image: the groups change nothing, and the loop is plain SimCLR
    distinct = torch.arange(6)
    torch.testing.assert_close(nt_xent(first, second, 0.5, distinct), nt_xent(first, second, 0.5))
    torch.testing.assert_close(
        nt_xent(first, second, 0.5).double(),
        _nt_xent_loop(first, second, 0.5, distinct),
        rtol=1e-5,
        atol=1e-6,
    )
    # masking the same-image negatives lowers the loss (fewer terms in every denominator)
    assert float(nt_xent(first, second, 0.5, groups)) < float(nt_xent(first, second, 0.5))


def test_losses():
    a = torch.randn(8, 16)
    assert float(nt_xent(a, a, 0.5)) < float(nt_xent(a, torch.randn(8, 16), 0.5))
    d = torch.tensor([0.2, 0.6, 1.2, 1.8])
    y = torch.tensor([False, False, True, True])
    assert torch.allclose(double_hinge_loss(d, y, 0.5), torch.tensor([0.0, 0.1, 0.3, 0.0]))


# -- the detector ----------------------------------------------------------------------------------
def test_one_class_beats_floor(one_class, data):
    scores = one_class.decision_function(data["test"])
    assert scores.shape == (96,) and scores.dtype == np.float64
    assert image_auroc(data["labels"], scores) > 0.8
    assert not one_class.semi_supervised_
    assert [r["epoch"] for r in one_class.history_] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["stage"] == 1 for r in one_class.history_)
    assert one_class.threshold_ is not None and one_class.decision_scores_.shape == (96,)
    predicted = one_class.predict(data["test"])
    assert set(np.unique(predicted)) <= {0, 1}


def test_semi_supervised_beats_floor(semi_supervised, data):
    scores = semi_supervised.decision_function(data["test"])
    assert image_auroc(data["labels"], scores) > 0.85
    assert semi_supervised.semi_supervised_
    assert any(r["stage"] == 2 for r in semi_supervised.history_)
    assert semi_supervised.decision_scores_.shape == (96 + 8,)


@pytest.mark.parametrize("which", ["one_class", "semi_supervised"])
def test_save_load_round_trip(which, request, data, tmp_path):
    detector = request.getfixturevalue(which)
    path = tmp_path / "model.pt"
    detector.save(path)
    for loaded in (AnoMem.load(path), Detector.load(path, device="cpu")):
        assert isinstance(loaded, AnoMem)
        np.testing.assert_array_equal(
            loaded.decision_function(data["test"]), detector.decision_function(data["test"])
        )
        assert loaded.threshold_ == detector.threshold_
        assert loaded.history_ == detector.history_
        assert loaded.semi_supervised_ == detector.semi_supervised_


def test_score_maps_and_dataset_input(one_class, data, tmp_path):
    from pyanomaly.data import ClassFolderDataset

    images = [data["test"][0], F.interpolate(data["test"][60][None].float(), size=(40, 48)).byte()[0]]
    scores, maps = one_class.score(images)
    np.testing.assert_allclose(scores, one_class.decision_function(images))
    assert [m.shape for m in maps] == [(32, 32), (40, 48)] and all(m.dtype == np.float32 for m in maps)
    assert all(np.isfinite(m).all() and m.min() >= 0 for m in maps)
    _write_class_folders(tmp_path, {"test": 3}, {"x": False})
    dataset = ClassFolderDataset(tmp_path, "test")
    stacked = torch.stack([dataset[i][0] for i in range(len(dataset))])
    np.testing.assert_array_equal(one_class.decision_function(dataset), one_class.decision_function(stacked))


def test_seed_reproducibility_and_input_formats(data):
    config = {**TINY, "epochs": 1, "classifier_epochs": 2}
    normal = data["normal"][:32]
    a = AnoMem(**config, seed=3).fit(normal, anomalies=data["anomalies"][:4])
    b = AnoMem(**config, seed=3).fit(list(normal), anomalies=data["anomalies"][:4].numpy())
    c = AnoMem(**config, seed=4).fit(normal, anomalies=data["anomalies"][:4])
    test = data["test"][::8]
    np.testing.assert_array_equal(a.decision_function(test), b.decision_function(test))
    assert not np.array_equal(a.decision_function(test), c.decision_function(test))
    # float in [0, 1] and a list of differently-sized uint8 images (resized to the training size)
    np.testing.assert_allclose(a.decision_function(test.float() / 255), a.decision_function(test), rtol=1e-4)
    resized = a.decision_function([F.interpolate(t[None].float(), size=48).byte()[0] for t in test])
    assert resized.shape == (len(test),)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "vgg"}, "backbone"),
        ({"memory_sizes": (256,)}, "memory_sizes"),
        ({"sampling_ratios": (0.0, 1.0)}, "sampling_ratios"),
        ({"scales": (4, 3)}, "scales"),
        ({"scale_weights": (1.0, -1.0)}, "scale_weights"),
        ({"temperature": 0}, "temperature"),
        ({"batch_size": 1}, "batch_size"),
        ({"margin": 1.5}, "margin"),
        ({"epochs": 0}, "epochs"),
        ({"augment": {"hue": 0.1}}, "augment"),
        ({"device": "nonsense"}, "device"),
        ({"contamination": 0.7}, "contamination"),
        ({"negatives": "same_image"}, "negatives"),
        ({"distribution_augmentation": "rot45"}, "distribution_augmentation"),
        ({"pretext": "jigsaw"}, "pretext"),
        ({"pretext_weight": 0}, "pretext_weight"),
        ({"contrastive_trains_encoder": False}, "needs a pretext"),
        ({"contrastive_trains_encoder": 0, "pretext": "rotation"}, "contrastive_trains_encoder"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AnoMem(**kwargs)


def test_bad_inputs_name_the_argument(one_class):
    detector = AnoMem(**TINY)
    with pytest.raises(ValueError, match=r"data\[0\] has shape \(5, 32, 32\)"):
        detector.fit(torch.zeros(4, 5, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"data\[0\]: float images must lie in \[0, 1\]"):
        detector.fit(torch.full((4, 3, 32, 32), 2.0))
    with pytest.raises(FileNotFoundError, match="data: image file not found: images/"):
        detector.fit("images/")
    with pytest.raises(ValueError, match="data must hold at least 2 normal images"):
        detector.fit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"y must be 4 labels"):
        detector.fit(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"anomalies\[0\]: float images"):
        detector.fit(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), anomalies=torch.full((2, 1, 32, 32), -1.0))
    with pytest.raises(ValueError, match="anomalies is empty"):
        detector.fit(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), anomalies=[])
    with pytest.raises(RuntimeError, match="not fitted"):
        detector.decision_function(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images\[0\] contains NaN"):
        one_class.decision_function(torch.full((2, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="images is empty"):
        one_class.decision_function(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))


def test_gray_input_follows_a_colour_model(one_class):
    """A gray image given to a colour model is replicated to RGB (as a gray file would be read)."""
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    np.testing.assert_array_equal(one_class.decision_function(gray), one_class.decision_function(gray.expand(2, 3, 32, 32)))


# -- protocols -------------------------------------------------------------------------------------
def _write_class_folders(root: Path, splits: dict[str, int], classes: dict[str, bool], seed: int = 0) -> None:
    from PIL import Image

    for split, count in splits.items():
        for k, (name, anomalous) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, img in enumerate(synthetic(count, anomalous, seed + 97 * k + (split == "test"))):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


class _MeanBrightness:
    """A stand-in detector (score = mean pixel value) to check the protocol's bookkeeping."""

    def fit(self, normal, anomalies=None):
        self.anomalies = None if anomalies is None else len(anomalies)
        return self

    def decision_function(self, images):
        return images.float().mean(dim=(1, 2, 3)).numpy()


def test_one_vs_all_protocol_and_table(tmp_path):
    _write_class_folders(tmp_path / "ds", {"train": 12, "test": 6}, {"blobs": False, "stripes": True})
    seen = []

    def factory():
        seen.append(_MeanBrightness())
        return seen[-1]

    result = one_vs_all(
        tmp_path / "ds", detector=factory, gammas=(0.0, 0.1), train_per_class=10, test_per_class=5
    )
    assert result["classes"] == ["blobs", "stripes"] and result["n_test"] == 10
    assert set(result["auroc"]) == {"0", "0.1"}
    assert result["n_train"]["0"]["blobs"] == {"normal": 10, "anomalies": 0}
    assert result["n_train"]["0.1"]["blobs"] == {"normal": 10, "anomalies": 1}
    assert [d.anomalies for d in seen] == [None, None, 1, 1]
    for key in ("0", "0.1"):
        values = result["auroc"][key]
        assert result["mean"][key] == pytest.approx(np.mean(list(values.values())))
        # the same scores rank one class normal then the other: AUROCs add up to 1
        assert values["blobs"] + values["stripes"] == pytest.approx(1.0)
    md, js = write_table(result, tmp_path / "table.md")
    assert "| **mean** |" in md.read_text() and "gamma = 0.1" in md.read_text()
    assert json.loads(js.read_text())["mean"] == result["mean"]
    with pytest.raises(ValueError, match="classes"):
        one_vs_all(tmp_path / "ds", detector=factory, classes=["cats"])
    with pytest.raises(ValueError, match="gammas"):
        one_vs_all(tmp_path / "ds", detector=factory, gammas=(1.5,))


def test_out_of_distribution_protocol_with_anomem(tmp_path):
    _write_class_folders(tmp_path / "in", {"train": 24, "test": 16}, {"a": False, "b": False})
    _write_class_folders(tmp_path / "out", {"test": 16}, {"c": True, "d": True}, seed=5)
    result = out_of_distribution(tmp_path / "in", tmp_path / "out", detector=TINY, test_limit=24)
    assert result["n_train"] == 48 and result["n_test_in"] == 24 and result["n_test_out"] == 24
    assert result["auroc"] > 0.7
    md, _ = write_table(result, tmp_path / "ood")
    assert "AUROC" in md.read_text()


@pytest.mark.data
@pytest.mark.skipif(not CIFAR.is_file(), reason="shared CIFAR-10 data absent")
def test_cifar10_smoke(tmp_path):
    classes = ("airplane", "frog")
    with tarfile.open(CIFAR) as tar:
        members = []
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] in classes and int(Path(parts[2]).stem) < 40:
                members.append(member)
                if len(members) == 2 * 2 * 40:  # both splits of both classes: stop reading the archive
                    break
        tar.extractall(tmp_path, members=members, filter="data")
    result = one_vs_all(
        tmp_path, detector={**TINY, "epochs": 1}, classes=["airplane"], gammas=(0.0, 0.1), train_per_class=40,
        test_per_class=40,
    )
    assert result["classes"] == ["airplane"] and result["n_test"] == 80
    assert all(0.0 <= v["airplane"] <= 1.0 for v in result["auroc"].values())


def test_cli_protocol_command(tmp_path, capsys):
    from pyanomaly.cli import main

    _write_class_folders(tmp_path / "ds", {"train": 16, "test": 8}, {"blobs": False, "stripes": True})
    _write_class_folders(tmp_path / "ood", {"test": 8}, {"stripes": True}, seed=9)
    tiny = []
    for item in ("backbone=resnet18", "width=8", "memory_sizes=[32,16]", "epochs=1"):
        tiny += ["--set", item]
    assert main(["protocol", "one-vs-all", str(tmp_path / "ds"), "--out", str(tmp_path / "ova"), "--classes",
                 "blobs", "--gammas", "0", "0.1", *tiny]) == 0
    result = json.loads((tmp_path / "ova.json").read_text())
    assert set(result["auroc"]) == {"0", "0.1"} and result["method"] == "anomem"
    assert "| blobs |" in capsys.readouterr().out
    assert main(["protocol", "ood", str(tmp_path / "ds"), "--out-data", str(tmp_path / "ood"),
                 "--out", str(tmp_path / "ood_table"), *tiny]) == 0
    assert 0 <= json.loads((tmp_path / "ood_table.json").read_text())["auroc"] <= 1
    assert main(["protocol", "ood", str(tmp_path / "ds"), "--out", str(tmp_path / "x")]) == 2
    assert "--out-data" in capsys.readouterr().err


def test_random_grayscale_option():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gray, _ = simclr_view(images, AugmentConfig(grayscale_p=1.0, jitter_p=0.0, noise_p=0.0), torch.Generator().manual_seed(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    colour, _ = simclr_view(images, AugmentConfig(grayscale_p=0.0, jitter_p=0.0, noise_p=0.0), torch.Generator().manual_seed(0))
    assert not torch.allclose(colour[:, 0], colour[:, 1])
    default, _ = simclr_view(images, AugmentConfig(jitter_p=0.0, noise_p=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(default, colour)  # the default (0.0) draws nothing: seeded runs are unchanged


@pytest.mark.parametrize("flags, expected", [(frozenset(), "fp32"), (frozenset({"amx_bf16"}), "bf16")])
def test_auto_precision_trains_bf16_only_on_amx_cpus_and_scores_fp32(monkeypatch, flags, expected):
    """"auto" on a CPU: stage 1 under bf16 autocast only with AMX; scoring stays fp32 either way."""
    import pyanomaly.models._precision as precision_module

    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: flags)
    seen = []
    real_autocast = torch.autocast

    def recording_autocast(*args, **kwargs):
        if kwargs.get("dtype") == torch.bfloat16:  # the encoder's autocast, not the fp32 islands inside
            seen.append((torch.is_grad_enabled(), kwargs.get("enabled", True)))
        return real_autocast(*args, **kwargs)

    monkeypatch.setattr(torch, "autocast", recording_autocast)
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    detector = AnoMem(**{**TINY, "epochs": 1}).fit(images)
    assert detector.train_precision_ == expected
    training = [enabled for grad, enabled in seen if grad]
    assert training and all(enabled == (expected == "bf16") for enabled in training)
    seen.clear()
    assert np.isfinite(detector.decision_function(images[:8])).all()
    assert seen and not any(enabled for _, enabled in seen)  # scoring: autocast off on the CPU


def test_auto_bf16_skips_a_non_finite_step_and_goes_on_in_fp32(monkeypatch, tmp_path):
    """The guard: the first non-finite gradient's step is skipped, a warning
    names it, the rest runs in fp32, and the record survives save / load."""
    import pyanomaly.models._precision as precision_module
    import pyanomaly.models.anomem.detector as detector_module

    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    calls = []
    monkeypatch.setattr(detector_module, "_gradients_finite", lambda params: calls.append(1) and False)
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    steps = {}

    def record(detector, _record):
        steps["bf16_after"] = detector.train_precision_ == "bf16"

    with pytest.warns(RuntimeWarning, match="non-finite bf16 gradient at epoch 1 step 1"):
        detector = AnoMem(**{**TINY, "epochs": 2}).fit(images, on_epoch_end=record)
    assert len(calls) == 1  # checked until the fallback, never after
    assert steps["bf16_after"] is False
    assert detector.train_precision_ == "bf16, fp32 from epoch 1 step 1"
    detector.save(tmp_path / "m.pt")
    assert AnoMem.load(tmp_path / "m.pt").train_precision_ == detector.train_precision_


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_runs_the_encoder_only_in_bf16(precision):
    """bf16 autocast covers the encoder alone: the Hopfield op (float32/float64 only on CPU) and the
    losses get fp32 maps, so a bf16 fit works on the CPU and its scores are finite."""
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    detector = AnoMem(**{**TINY, "epochs": 1}, precision=precision).fit(images)
    maps = detector.model_.features(images[:4])
    assert all(m.dtype == torch.float32 for m in maps)
    assert np.isfinite(detector.decision_function(images[:8])).all()
    with pytest.raises(ValueError, match="precision"):
        AnoMem(**TINY, precision="half")


def test_activation_checkpointing_keeps_gradients_and_batchnorm_statistics():
    """Recomputing the blocks in the backward: the same gradients, and BatchNorm's running
    statistics and batch counter updated once (the recompute would otherwise update them again)."""
    torch.manual_seed(0)
    plain, recomputed = resnet18(width=8, small_input=True), resnet18(width=8, small_input=True)
    recomputed.load_state_dict(plain.state_dict())
    recomputed.checkpoint_activations = True
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for encoder in (plain, recomputed):
        encoder.train()
        sum(o.square().mean() for o in encoder(x)).backward()
        grads.append([p.grad for p in encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name  # running_mean / running_var / num_batches_tracked
    assert int(recomputed.layer1[0].bn1.num_batches_tracked) == 1
    assert recomputed.layer1[0].bn1.momentum == plain.layer1[0].bn1.momentum


def test_activation_checkpointing_fit_matches_plain_fit(data):
    config = {**TINY, "epochs": 1, "seed": 5}
    plain = AnoMem(**config).fit(data["normal"][:32])
    recomputed = AnoMem(**config, activation_checkpointing=True).fit(data["normal"][:32])
    assert recomputed.model_.encoder.checkpoint_activations and not plain.model_.encoder.checkpoint_activations
    for (name, a), b in zip(plain.model_.state_dict().items(), recomputed.model_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert AnoMem(**config, activation_checkpointing=True).get_params()["activation_checkpointing"] is True


def _turn_of(image: torch.Tensor, source: torch.Tensor) -> int | None:
    """k if ``image`` is ``source`` turned by k quarter turns, else None."""
    return next((k for k in range(4) if torch.equal(image, torch.rot90(source, k, dims=(-2, -1)))), None)


def test_random_quarter_turns_turns_each_image_by_its_own_seeded_multiple_of_90_degrees():
    images = torch.rand(64, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    turned = random_quarter_turns(images, torch.Generator().manual_seed(1))
    turns = [_turn_of(t, x) for t, x in zip(turned, images)]
    assert None not in turns and set(turns) == {0, 1, 2, 3}
    assert torch.equal(turned, random_quarter_turns(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(turned, random_quarter_turns(images, torch.Generator().manual_seed(2)))
    assert random_quarter_turns(images[:0], torch.Generator()).shape == (0, 3, 5, 5)


@pytest.mark.parametrize("augmentation", [None, "rot90"])
def test_distribution_augmentation_turns_the_training_images_before_both_views(monkeypatch, data, augmentation):
    """With "rot90" both views of an image are drawn from the same turned image (a turned image is a
    new instance); without it the views come from the upright images and nothing else is drawn."""
    import pyanomaly.models.anomem.detector as detector_module

    seen = []

    def recording_view(images, *args):
        seen.append(images.clone())
        return simclr_view(images, *args)

    monkeypatch.setattr(detector_module, "simclr_view", recording_view)
    normal = data["normal"][:32]
    AnoMem(**{**TINY, "epochs": 1}, distribution_augmentation=augmentation).fit(normal)
    upright = normal.float() / 255
    first, second = seen[0], seen[1]  # the two views of the first batch
    assert torch.equal(first, second)
    turns = [next((k for x in upright if (k := _turn_of(v, x)) is not None), None) for v in first]
    assert None not in turns
    assert set(turns) == {0} if augmentation is None else len(set(turns)) > 1


def test_distribution_augmentation_needs_square_images():
    images = torch.rand(8, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="square"):
        AnoMem(**{**TINY, "epochs": 1}, distribution_augmentation="rot90").fit(images)
    AnoMem(**{**TINY, "epochs": 1}, distribution_augmentation="rot90", image_size=16).fit(images)


def test_all_quarter_turns_holds_every_turn_of_every_image_with_its_label():
    images = torch.rand(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    turned, turns = all_quarter_turns(images)
    assert turned.shape == (12, 2, 5, 5) and turns.dtype == torch.int64
    assert turns.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [_turn_of(t, images[i % 3]) for i, t in enumerate(turned)] == turns.tolist()


def test_rotation_loss_is_the_cross_entropy_of_the_head_on_pooled_last_scale_features():
    torch.manual_seed(0)
    model = AnoMemModel(
        backbone="resnet18", in_channels=3, width=8, small_input=True, scales=(3, 4), memory_sizes=(16, 8),
        beta=None, hopfield_iters=2, hopfield_tol=1e-4, projection_dim=None, classifier_pool=2,
        classifier_hidden=8, rotation_head=True,
    ).eval()
    images, turns = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 1, 0])
    logits = model.rotation_head(model.features(images)[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(model.rotation_loss(images, turns), F.cross_entropy(logits, turns))
    plain = AnoMemModel(
        backbone="resnet18", in_channels=3, width=8, small_input=True, scales=(3, 4), memory_sizes=(16, 8),
        beta=None, hopfield_iters=2, hopfield_tol=1e-4, projection_dim=None, classifier_pool=2, classifier_hidden=8,
    )
    assert plain.rotation_head is None and not any(k.startswith("rotation_head") for k in plain.state_dict())
    with pytest.raises(RuntimeError, match="rotation head"):
        plain.rotation_loss(images, turns)


def test_rotation_pretext_trains_the_head_on_turned_views_and_keeps_the_memory_upright(monkeypatch, data, tmp_path):
    """The head sees a third view turned by its recorded turns; the contrastive views stay upright;
    the head learns (its loss falls well below chance, ln 4, on images whose top differs from their
    bottom); the memory score is the paper's, saved and loaded with the head."""
    import pyanomaly.models.anomem.detector as detector_module

    seen = {"inputs": [], "views": [], "turned": []}

    def recording_view(images, *args):
        out = simclr_view(images, *args)
        seen["inputs"].append(images.clone())
        seen["views"].append(out[0])
        return out

    original = AnoMemModel.rotation_loss

    def recording_loss(self, turned, turns):
        seen["turned"].append((turned, turns))
        return original(self, turned, turns)

    monkeypatch.setattr(detector_module, "simclr_view", recording_view)
    monkeypatch.setattr(AnoMemModel, "rotation_loss", recording_loss)
    normal = data["normal"].clone()
    normal[:, :, :8] = 255  # a white top band: the turn of an image is visible
    detector = AnoMem(**{**TINY, "epochs": 8}, pretext="rotation").fit(normal)
    turned, turns = seen["turned"][0]
    third = seen["views"][2]  # the first batch's views: two contrastive, one for the head
    assert [_turn_of(t, third[i % len(third)]) for i, t in enumerate(turned)] == turns.tolist()
    assert set(turns.tolist()) == {0, 1, 2, 3}
    upright = normal.float() / 255  # all three views of the first batch are drawn from upright images
    for images in seen["inputs"][:3]:
        assert all(any(_turn_of(x, u) == 0 for u in upright) for x in images)
    history = [r["pretext"] for r in detector.history_]
    assert history[0] > 1.0 and min(history[-2:]) < 0.5 * math.log(4), history
    assert detector.get_params()["pretext"] == "rotation"
    scores = detector.decision_function(data["test"])
    path = tmp_path / "model.pt"
    detector.save(path)
    loaded = AnoMem.load(path)
    assert loaded.model_.rotation_head is not None
    np.testing.assert_allclose(loaded.decision_function(data["test"]), scores, rtol=1e-5)


def test_rotation_pretext_needs_square_images():
    images = torch.rand(8, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r'pretext="rotation" needs square images'):
        AnoMem(**{**TINY, "epochs": 1}, pretext="rotation").fit(images)


@pytest.mark.parametrize("contrastive_trains_encoder", [True, False])
def test_contrastive_trains_encoder_false_leaves_the_encoder_to_the_pretext(monkeypatch, data, contrastive_trains_encoder):
    """With a pretext loss that has no gradient, the encoder's weights move only when the contrastive
    loss trains it; the memories train either way."""
    monkeypatch.setattr(AnoMemModel, "rotation_loss", lambda self, turned, turns: turned.new_zeros(()))
    config = {**TINY, "epochs": 1, "pretext": "rotation", "contrastive_trains_encoder": contrastive_trains_encoder}
    detector = AnoMem(**config)
    detector.fit(data["normal"][:32])  # 1 step; then compare against the seed's initial weights
    torch.manual_seed(detector.seed)
    initial = detector._build_model(3, (32, 32))
    conv = "encoder.layer1.0.conv1.weight"
    moved = not torch.equal(detector.model_.state_dict()[conv], initial.state_dict()[conv])
    assert moved == contrastive_trains_encoder
    assert not torch.equal(detector.model_.memories[0].patterns, initial.memories[0].patterns)


def assert_patterns_are_feature_vectors(patterns: torch.Tensor, fmap: torch.Tensor) -> None:
    """Every pattern (M, C) is (to fp32 rounding) one of the feature vectors of ``fmap`` (B, C, H, W)."""
    vectors = fmap.flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])
    exact = "donot_use_mm_for_euclid_dist"
    distance = torch.cdist(patterns, vectors, compute_mode=exact).min(dim=1).values
    assert float(distance.max()) < 1e-4 * float(vectors.norm(dim=1).mean())


def test_memory_init_features_starts_the_patterns_at_training_feature_vectors(monkeypatch, data):
    detector = AnoMem(**{**TINY, "epochs": 1}, memory_init="features")
    normal = data["normal"][:40]
    seen = {}

    def record_and_stop(images, n_normal, *args):
        model = detector.model_.eval()
        with torch.no_grad():
            maps = model.features(normal.float() / 255)
        seen["maps"] = maps
        seen["patterns"] = [m.patterns.detach().clone() for m in model.memories]
        raise KeyboardInterrupt

    monkeypatch.setattr(detector, "_train_stage1", record_and_stop)
    with pytest.raises(KeyboardInterrupt):
        detector.fit(normal)
    for fmap, patterns in zip(seen["maps"], seen["patterns"]):
        assert_patterns_are_feature_vectors(patterns, fmap)
        assert len(torch.unique(patterns, dim=0)) == len(patterns)  # distinct positions (enough of them)


def test_memory_init_final_features_stores_the_trained_encoders_states(data):
    """After stage 1 the patterns are the trained encoder's vectors at training positions, the
    pattern LayerNorm is the state LayerNorm (so the stored patterns are those positions' states),
    and the threshold is fitted on the scores of that memory."""
    normal = data["normal"][:40]
    detector = AnoMem(**{**TINY, "epochs": 1}, memory_init="final_features").fit(normal)
    model = detector.model_.eval()
    with torch.no_grad():
        maps = model.features(normal.float() / 255)
        for memory, fmap in zip(model.memories, maps):
            assert_patterns_are_feature_vectors(memory.patterns, fmap)
            torch.testing.assert_close(memory.stored_patterns(), memory.states(memory.patterns))
    above = (detector.decision_function(normal) > detector.threshold_).mean()
    assert above == pytest.approx(detector.contamination, abs=1 / len(normal))
