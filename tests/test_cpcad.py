"""Tests for CPCAD: a tiny config on the built-in synthetic data, persistence, errors, layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pyanomaly.data import MVTecDataset
from pyanomaly.demo import make_dataset, make_image
from pyanomaly.metrics import image_auroc, pixel_auroc
from pyanomaly.models.cpcad import CPCAD
from pyanomaly.models.cpcad.torch_model import (
    DIRECTIONS,
    CPCADModel,
    orient,
    unorient,
    windows_from_grid,
    windows_to_grid,
)
from pyanomaly.nn.preact_resnet import PreActResNetEncoder

SHARED_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_format"

#: 64 px images, patches 32/16, sub-patches 8/4 (a 7x7 window, the paper's geometry at 1/8 scale).
TINY = dict(
    image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(16, 32, 64),
    blocks=(1, 1, 1), shared_encoder=True, prediction_steps=2, batch_size=16, lr=1e-3, crop_fraction=1.0,
    bank_size=2048, score_batch_size=16, verbose=False,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpcad") / "data"
    root = make_dataset(folder, n_train=32, n_test_good=12, n_test_defect=6)
    train = MVTecDataset(root, "synthetic", "train")
    test = MVTecDataset(root, "synthetic", "test")
    samples = [test[i] for i in range(len(test))]
    return train, samples


@pytest.fixture(scope="module")
def fitted(synthetic):
    train, _ = synthetic
    torch.set_num_threads(1)
    return CPCAD(**TINY, epochs=8, seed=0).fit(train)


def test_tiny_config_beats_auroc_floor(fitted, synthetic):
    _, samples = synthetic
    images = [s.image for s in samples]
    labels = np.array([s.label for s in samples])
    masks = np.stack([s.mask.numpy() for s in samples])
    scores, maps = fitted.score(images)
    assert image_auroc(labels, scores) >= 0.85
    assert pixel_auroc(masks, np.stack(maps)) >= 0.85
    # "shift" defects (half-period phase shift: normal brightness statistics, only context tells)
    # need the trained predictors: an untrained model gets about 0.75 pixel AUROC on them
    shift = np.array([s.defect_type in ("good", "shift") for s in samples])
    print("floors:", image_auroc(labels, scores), pixel_auroc(masks, np.stack(maps)),
          pixel_auroc(masks[shift], np.stack(maps)[shift]))
    assert pixel_auroc(masks[shift], np.stack(maps)[shift]) >= 0.85
    # a broken scorer (scores unrelated to the images) fails the same floor
    assert image_auroc(labels, np.random.default_rng(0).permutation(scores)) < 0.85
    # training works: the objective falls well below chance, ln(17) = 2.83
    assert fitted.history_[0] > 2.6 and fitted.history_[-1] < 2.2


def test_contract_shapes_and_predict(fitted, synthetic):
    _, samples = synthetic
    images = [s.image for s in samples[:3]]
    scores = fitted.decision_function(images)
    assert scores.shape == (3,) and scores.dtype == np.float64
    maps = fitted.anomaly_map(torch.stack(images))
    assert maps.shape == (3, 64, 64)
    assert set(fitted.predict(images).tolist()) <= {0, 1}
    assert fitted.threshold_ is not None and fitted.decision_scores_.shape == (32,)
    assert len(fitted.history_) == 8
    # input resolution is kept, also for non-square images of different sizes
    odd = [
        torch.randint(0, 256, (1, 50, 70), dtype=torch.uint8),
        torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8),
    ]
    odd_maps = fitted.anomaly_map(odd)
    assert [m.shape for m in odd_maps] == [(50, 70), (40, 40)]


def test_fit_accepts_folder_dataset_and_tensor(synthetic, tmp_path):
    from PIL import Image

    from pyanomaly.data import FolderDataset

    train, _ = synthetic
    for i in range(3):
        rgb = np.repeat(train[i].image.numpy()[0][..., None], 3, axis=2)
        Image.fromarray(rgb).save(tmp_path / f"{i}.png")
    folder = FolderDataset(tmp_path, grayscale=False)  # RGB: converted to gray inside
    det = CPCAD(**TINY, epochs=0).fit(folder)
    batch = torch.stack([train[i].image for i in range(3)])  # the same images, gray, as a tensor
    np.testing.assert_allclose(det.decision_function(folder), det.decision_function(batch), atol=0.05)


def test_save_load_identical_scores(fitted, synthetic, tmp_path):
    _, samples = synthetic
    images = [s.image for s in samples[:6]]
    fitted.save(tmp_path / "model.pt")
    loaded = CPCAD.load(tmp_path / "model.pt")
    a_scores, a_maps = fitted.score(images)
    b_scores, b_maps = loaded.score(images)
    np.testing.assert_array_equal(a_scores, b_scores)
    np.testing.assert_array_equal(np.stack(a_maps), np.stack(b_maps))
    assert loaded.threshold_ == fitted.threshold_ and loaded.history_ == fitted.history_
    assert loaded.config() == fitted.config()


def test_seed_reproducible_on_cpu(synthetic):
    train, samples = synthetic
    images = [s.image for s in samples[:4]]
    subset = [train[i].image for i in range(8)]
    cfg = dict(TINY, epochs=1, crop_fraction=0.75)
    a = CPCAD(**cfg, seed=3).fit(subset)
    b = CPCAD(**cfg, seed=3).fit(subset)
    c = CPCAD(**cfg, seed=4).fit(subset)
    assert a.history_ == b.history_
    np.testing.assert_array_equal(a.decision_function(images), b.decision_function(images))
    assert a.history_ != c.history_


def test_nested_and_grid_layouts(fitted, synthetic):
    _, samples = synthetic
    images = [s.image for s in samples[:4]]
    grid_scores = fitted.subpatch_scores(images)
    fitted.layout = "nested"
    try:
        nested_scores = fitted.subpatch_scores(images)
    finally:
        fitted.layout = "grid"
    # no normalisation in the encoder: both layouts compute the same losses for the same weights
    torch.testing.assert_close(nested_scores, grid_scores, rtol=1e-4, atol=1e-4)
    subset = [samples[i].image for i in range(4)]
    nested = CPCAD(**dict(TINY, layout="nested", epochs=1), seed=0).fit(subset)
    assert nested.decision_function(subset).shape == (4,)


def test_four_separate_encoders_and_fast_stem(synthetic):
    train, _ = synthetic
    subset = [train[i].image for i in range(4)]
    det = CPCAD(**dict(TINY, shared_encoder=False, stem="fast", epochs=1, sub_size=8), seed=0).fit(subset)
    assert len(det.model_.encoders) == 4 and len(det.banks_) == 4
    assert np.isfinite(det.decision_function(subset)).all()


@pytest.mark.parametrize(
    "data, error, match",
    [
        (torch.zeros(2, 64, 64, dtype=torch.uint8), ValueError, r"data has shape \(2, 64, 64\): no channel axis"),
        (torch.full((2, 1, 64, 64), 2.0), ValueError, r"data\[0\]: float images must lie in \[0, 1\]"),
        (torch.full((2, 1, 64, 64), float("nan")), ValueError, r"data\[0\] contains NaN"),
        (torch.zeros(2, 1, 64, 64, dtype=torch.int32), ValueError, r"data\[0\] must hold uint8 or float"),
        ([torch.zeros(1, 64, 64, dtype=torch.uint8), "x"], FileNotFoundError, r"data\[1\]: image file not found: x"),
        ([torch.zeros(2, 64, 64, dtype=torch.uint8)], ValueError, r"data\[0\] has shape \(2, 64, 64\)"),
        ([], ValueError, "data is empty"),
        ([torch.zeros(1, 6, 64, dtype=torch.uint8)], ValueError, r"data\[0\] is 6x64 pixels; this detector needs at least 8"),
        ("images/", FileNotFoundError, "data: image file not found: images/"),
        (42, TypeError, "data must be image paths, a folder"),
    ],
)
def test_bad_fit_input(data, error, match):
    with pytest.raises(error, match=match):
        CPCAD(**TINY, epochs=1).fit(data)


def test_bad_scoring_input(fitted):
    with pytest.raises(ValueError, match=r"images has shape \(5, 64, 64\): no channel axis"):
        fitted.decision_function(torch.zeros(5, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images\[0\]: float images must lie in \[0, 1\]"):
        fitted.anomaly_map([torch.full((1, 64, 64), 255.0)])


def test_not_fitted():
    det = CPCAD(**TINY)
    with pytest.raises(RuntimeError, match="not fitted"):
        det.decision_function([torch.zeros(1, 64, 64, dtype=torch.uint8)])
    with pytest.raises(RuntimeError, match="not fitted"):
        det.predict([torch.zeros(1, 64, 64, dtype=torch.uint8)])
    with pytest.raises(RuntimeError, match="not fitted"):
        det.save("unused.pt")


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(patch_size=128), r"patch_size \(128\) must not exceed image_size \(64\)"),
        (dict(sub_size=40), r"sub_size \(40\) must not exceed patch_size"),
        (dict(patch_stride=12), "patch_stride .* must divide image_size - patch_size"),
        (dict(sub_stride=3), "sub_stride .* must divide patch_stride"),
        (dict(sub_size=32), "at least 3 sub-patches per side"),
        (dict(layout="tiles"), "layout must be one of"),
        (dict(stem="big"), "stem must be one of"),
        (dict(top_k=0), "top_k must be"),
        (dict(top_k=1.5), "top_k must be"),
        (dict(crop_fraction=0.0), "crop_fraction must be in"),
        (dict(epochs=-1), "epochs must be a positive int"),
        (dict(image_size=64.0), "image_size must be a positive int"),
        (dict(directions=("up",)), "directions must be distinct values"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(contamination=0.7), "contamination must be in"),
    ],
)
def test_bad_config(override, match):
    with pytest.raises(ValueError, match=match):
        CPCAD(**{**TINY, **override})


def test_orient_unorient_and_window_grid_helpers():
    z = torch.randn(2, 7, 7, 3)
    s = z[..., 0]
    for direction in DIRECTIONS:
        assert torch.equal(unorient(orient(z, direction)[..., 0], direction), s)
    # "above": context rows above the target, i.e. prediction runs downwards (unchanged)
    assert torch.equal(orient(z, "above"), z)
    # "left": canonical row r is original column r
    assert torch.equal(orient(z, "left")[:, 2, 5], z[:, 5, 2])
    grid = torch.randn(2, 15, 15, 4)
    windows = windows_from_grid(grid, 7, 4)  # B nh nw m m D
    assert windows.shape == (2, 3, 3, 7, 7, 4)
    assert torch.equal(windows[:, 1, 2, 3, 0], grid[:, 4 + 3, 8 + 0])
    counts = windows_to_grid(torch.ones(1, 3, 3, 7, 7), 7, 4, (15, 15))
    assert counts[0, 0, 0] == 1 and counts[0, 4, 4] == 4 and counts[0, 7, 7] == 1 and counts[0, 8, 8] == 4


def test_losses_credited_to_targets():
    torch.manual_seed(0)
    model = CPCADModel(directions=("above",), prediction_steps=2, widths=(8,), blocks=(1,), strides=(1,))
    windows = torch.randn(3, 7, 7, model.dim)
    loss_sum, count, objective = model([windows])
    # "above" with K = 2: row y predicts rows y + 2 and y + 3, so rows 0 and 1 are never targets
    assert torch.equal(count[:, 0], torch.tensor([0.0, 0, 1, 2, 2, 2, 2]))
    assert (loss_sum[:, :2] == 0).all() and (loss_sum[:, 2:] > 0).all()
    assert objective.ndim == 0 and torch.isfinite(objective)


@pytest.mark.parametrize("stem, size, expected", [("gim", 16, 16), ("fast", 64, 16)])
def test_encoder(stem, size, expected):
    enc = PreActResNetEncoder(1, widths=(8, 16, 32), stem=stem)
    assert enc.feature_map(torch.zeros(2, 1, size, size)).shape == (2, 32, expected // 4, expected // 4)
    assert enc(torch.zeros(5, 1, size, size)).shape == (5, 32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())


def test_make_image_masks():
    rng = np.random.default_rng(0)
    for defect in ("scratch", "blob", "shift"):
        image, mask = make_image(rng, 64, defect)
        assert image.dtype == np.uint8 and image.shape == (64, 64) and mask.any()
    image, mask = make_image(rng, 64, None)
    assert not mask.any()


@pytest.mark.data
@pytest.mark.skipif(not SHARED_MVTEC.is_dir(), reason="shared MVTec-format data not present")
@pytest.mark.parametrize("category", ["glass", "magnetic_tile"])
def test_shared_data_smoke(category):
    if not (SHARED_MVTEC / category).is_dir():
        pytest.skip(f"{category} not present")
    train = MVTecDataset(SHARED_MVTEC, category, "train")
    test = MVTecDataset(SHARED_MVTEC, category, "test")
    images = [train[i].image for i in range(min(8, len(train)))]
    det = CPCAD(**TINY, epochs=1, seed=0).fit(images)
    picks = [i for i, label in enumerate(test.labels) if label == 0][:2] + [
        i for i, label in enumerate(test.labels) if label == 1
    ][:2]
    samples = [test[i] for i in picks]
    scores, maps = det.score([s.image for s in samples])
    assert np.isfinite(scores).all()
    assert all(m.shape == tuple(s.image.shape[1:]) for m, s in zip(maps, samples))


@pytest.mark.parametrize(
    "credit, first_column",
    [("target", [0, 0, 1, 2, 2, 2, 2]), ("context", [2, 2, 2, 2, 1, 0, 0]), ("both", [2, 2, 3, 4, 3, 2, 2])],
)
def test_losses_credited_to_context_or_both(credit, first_column):
    torch.manual_seed(0)
    model = CPCADModel(directions=("above",), prediction_steps=2, widths=(8,), blocks=(1,), strides=(1,))
    windows = torch.randn(3, 7, 7, model.dim)
    generator = torch.Generator().manual_seed(0)
    loss_sum, count, objective = model([windows], credit=credit, generator=generator)
    # "above", K = 2: context row y predicts target rows y + 2 (k = 1) and y + 3 (k = 2)
    assert count[:, 0].tolist() == first_column
    assert ((loss_sum > 0) == (count > 0)).all()
    reference = model([windows], generator=torch.Generator().manual_seed(0))[2]
    assert torch.equal(objective, reference)  # the training objective does not depend on credit


def test_lr_factor_warmup_then_cosine():
    from pyanomaly.models.cpcad.detector import lr_factor

    cosine = lr_factor("cosine", warmup_steps=4, total_steps=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(9) == pytest.approx(0.5) and cosine(14) == pytest.approx(0.0)
    constant = lr_factor("constant", warmup_steps=0, total_steps=10)
    assert all(constant(s) == 1.0 for s in range(12))


def test_position_score_norm_standardises_training_scores_and_round_trips(synthetic, tmp_path):
    train, samples = synthetic
    det = CPCAD(**TINY, epochs=1, seed=0, score_norm="position", lr_schedule="cosine", warmup_epochs=1).fit(train)
    mean, std = det.score_stats_["infonce"]
    assert mean.shape == std.shape == (det.grid_size, det.grid_size) and (std > 0).all()
    train_grid = det.subpatch_scores(train)
    assert float(train_grid.mean(0).abs().max()) < 1e-3  # each position: mean 0 (float32 sums of z-scores)
    raw = CPCAD(**TINY, epochs=1, seed=0, lr_schedule="cosine", warmup_epochs=1).fit(train)
    torch.testing.assert_close(raw.subpatch_scores(samples[:3]), det._subpatch_scores([s.image for s in samples[:3]]))
    det.save(tmp_path / "m.pt")
    loaded = CPCAD.load(tmp_path / "m.pt")
    np.testing.assert_array_equal(loaded.decision_function(samples[:4]), det.decision_function(samples[:4]))


def test_knn_and_combined_scores(synthetic, tmp_path):
    """knn: each sub-patch's distance to its nearest bank embedding (other images' rows for a training
    image); combined: the sum of both standardised components."""
    train, samples = synthetic
    images = [s.image for s in samples[:4]]
    knn = CPCAD(**{**TINY, "bank_size": 10**6}, epochs=1, seed=0, anomaly_score="knn").fit(train)
    grids = knn._subpatch_grid(knn._resize(images), None)
    bank = knn.banks_[0]
    brute = torch.cdist(grids[0].reshape(-1, bank.shape[1]).float(), bank).min(1).values.reshape(4, knn.grid_size, -1)
    torch.testing.assert_close(knn.subpatch_scores(images), brute, rtol=1e-4, atol=1e-4)
    train_images = [train[i].image for i in range(3)]
    own = knn._knn(knn._subpatch_grid(knn._resize(train_images), None), torch.arange(3))
    assert float(own.min()) > 0  # a training image does not find itself
    combined = CPCAD(**TINY, epochs=1, seed=0, anomaly_score="combined", score_norm="position").fit(train)
    assert set(combined.score_stats_) == {"infonce", "knn", "infonce_abs"}
    parts = combined._component_grids(images)
    expected = sum((parts[k] - combined.score_stats_[k][0]) / combined.score_stats_[k][1] for k in parts)
    torch.testing.assert_close(combined.subpatch_scores(images), expected)
    combined.save(tmp_path / "c.pt")
    np.testing.assert_array_equal(CPCAD.load(tmp_path / "c.pt").decision_function(images), combined.decision_function(images))


def test_two_sided_infonce_scores_losses_below_the_training_range(synthetic, tmp_path):
    """infonce_sides="both": the position-standardised loss's absolute value, standardised again over
    the training images; a loss far below its position's range scores high, as one far above."""
    train, samples = synthetic
    images = [s.image for s in samples[:4]]
    det = CPCAD(**TINY, epochs=1, seed=0, anomaly_score="combined", score_norm="position",
                infonce_sides="both").fit(train)
    (m, s), (m2, s2), (mk, sk) = (det.score_stats_[k] for k in ("infonce", "infonce_abs", "knn"))
    parts = det._component_grids(images)
    expected = ((parts["infonce"] - m) / s).abs().sub(m2).div(s2) + (parts["knn"] - mk) / sk
    torch.testing.assert_close(det.subpatch_scores(images), expected)
    # each position's two-sided InfoNCE part has mean 0 over the training images
    train_part = det._normalized({"infonce": det._component_grids([train[i].image for i in range(len(train))])["infonce"]})
    assert float(train_part.mean(0).abs().max()) < 1e-3
    low, high = m - 6 * s, m + 6 * s  # (G, G) losses far below and far above the training range
    both = det._normalized({"infonce": torch.stack([low, high])})
    assert torch.allclose(both[0], both[1]) and float(both.min()) > 0
    det.infonce_sides = "upper"  # the statistics of both are fitted either way
    upper = det._normalized({"infonce": torch.stack([low, high])})
    assert float(upper[0].max()) < 0 < float(upper[1].min())
    det.infonce_sides = "both"
    det.save(tmp_path / "b.pt")
    loaded = CPCAD.load(tmp_path / "b.pt")
    assert loaded.infonce_sides == "both"
    np.testing.assert_array_equal(loaded.decision_function(images), det.decision_function(images))
    del loaded.score_stats_["infonce_abs"]  # a model saved before the option: named, not a KeyError
    with pytest.raises(RuntimeError, match="infonce_sides"):
        loaded.decision_function(images)


@pytest.mark.parametrize("kwargs, match", [({"credit": "left"}, "credit"), ({"lr_schedule": "step"}, "lr_schedule"),
                                           ({"infonce_sides": "lower"}, "infonce_sides"),
                                           ({"infonce_sides": "both"}, "score_norm='position'"),
                                           ({"anomaly_score": "l2"}, "anomaly_score"),
                                           ({"warmup_epochs": -1}, "warmup_epochs"), ({"score_norm": "z"}, "score_norm"),
                                           ({"precision": "fp16"}, "precision"), ({"test_negatives": 0}, "test_negatives")])
def test_new_options_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPCAD(**TINY, **kwargs)


def test_pad_aspect_keeps_the_ratio_and_cuts_maps_back(synthetic):
    from pyanomaly.models.cpcad.detector import _pad_square

    wide = torch.arange(2 * 6, dtype=torch.uint8).view(1, 2, 6) * 10
    square = _pad_square(wide)
    assert square.shape == (1, 6, 6) and torch.equal(square[:, 2:4], wide)
    train, samples = synthetic
    det = CPCAD(**TINY, epochs=1, seed=0, aspect="pad").fit(train)
    images = [samples[0].image[:, :40, :], samples[1].image]  # 40 x 64 and 64 x 64
    scores, maps = det.score(images)
    assert maps[0].shape == (40, 64) and maps[1].shape == (64, 64) and np.isfinite(scores).all()
    valid = det._valid_cells([(40, 64), (64, 64)])
    g = det.grid_size
    assert valid[1].all() and not valid[0].all() and valid[0][g // 2].all()
    assert not valid[0][0].any() and not valid[0][-1].any()  # rows wholly in the top / bottom margin
    np.testing.assert_allclose(det.decision_function(images), scores)


def test_on_epoch_end_learning_curve_leaves_training_unchanged(synthetic):
    train, samples = synthetic
    images = [s.image for s in samples[:4]]
    seen = []

    def record(detector, info):
        train_grid, grid = detector.scores_now(train, images)
        seen.append((info["epoch"], grid.shape, detector.banks_ is None))

    det = CPCAD(**TINY, epochs=2, seed=0).fit(train, on_epoch_end=record)
    g = det.grid_size
    assert seen == [(1, (4, g, g), True), (2, (4, g, g), True)]
    plain = CPCAD(**TINY, epochs=2, seed=0).fit(train)
    np.testing.assert_array_equal(det.decision_function(images), plain.decision_function(images))


def test_bf16_precision_fits_and_scores_in_fp32(synthetic):
    train, samples = synthetic
    det = CPCAD(**TINY, epochs=1, seed=0, precision="bf16").fit(train)
    windows = det._windows(det._resize([samples[0].image]), None)
    assert windows[0].dtype == torch.bfloat16  # the encoder ran under autocast
    assert det.banks_[0].dtype == torch.float32 and np.isfinite(det.decision_function(samples[:4])).all()


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputing the blocks in the backward is exact: same loss and weight gradients."""
    torch.manual_seed(0)
    plain = PreActResNetEncoder(1, (8, 16, 32), (2, 1, 1), (1, 2, 2), "gim")
    recomputed = PreActResNetEncoder(1, (8, 16, 32), (2, 1, 1), (1, 2, 2), "gim")
    recomputed.load_state_dict(plain.state_dict())
    recomputed.checkpoint_activations = True
    x = torch.randn(6, 1, 16, 16)
    grads = []
    for encoder in (plain, recomputed):
        encoder.zero_grad()
        (encoder(x) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    det = CPCAD(**TINY, epochs=1, activation_checkpointing=True)
    det.model_ = det._build_model()
    assert all(e.checkpoint_activations for e in det.model_.encoders)
