"""The detector layer both methods share (pyanomaly.models.base, pyanomaly.data.as_images)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyanomaly import AnoMem, CPCAD
from pyanomaly.data import MVTecDataset, as_images
from pyanomaly.demo import make_dataset
from pyanomaly.metrics import f1_max
from pyanomaly.models.base import Detector, resolve_device

CPCAD_TINY = dict(
    image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(8, 16, 32),
    blocks=(1, 1, 1), shared_encoder=True, prediction_steps=2, crop_fraction=1.0, bank_size=1024,
    score_batch_size=16, epochs=3, verbose=False, seed=0,
)
ANOMEM_TINY = dict(backbone="resnet18", width=8, memory_sizes=(16, 8), epochs=1, batch_size=16, image_size=32,
                   classifier_epochs=5, verbose=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("layer") / "data", n_train=16, n_test_good=6, n_test_defect=3)
    test = MVTecDataset(root, "synthetic", "test")
    samples = [test[i] for i in range(len(test))]
    return root, MVTecDataset(root, "synthetic", "train"), samples


@pytest.fixture(scope="module")
def cpcad(data):
    torch.set_num_threads(1)
    return CPCAD(**CPCAD_TINY).fit(data[1])


@pytest.fixture(scope="module")
def anomem(data):
    return AnoMem(**ANOMEM_TINY).fit(data[1])


# -- parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs", [(CPCAD, CPCAD_TINY), (AnoMem, ANOMEM_TINY)])
def test_sklearn_clone_and_params_round_trip(cls, kwargs):
    from sklearn.base import clone
    from sklearn.utils.estimator_checks import check_get_params_invariance, check_set_params

    detector = cls(**kwargs)
    params = detector.get_params()
    assert set(params) == set(cls._get_param_names()) and params["epochs"] == kwargs["epochs"]
    copy = clone(detector)
    assert type(copy) is cls and copy.get_params() == params and copy is not detector
    check_get_params_invariance(cls.__name__, detector)
    check_set_params(cls.__name__, cls(**kwargs))
    detector.set_params(epochs=7, contamination=0.5)
    assert detector.epochs == 7 and detector.get_params()["epochs"] == 7 and detector.contamination == 0.5
    assert cls(**detector.get_params()).get_params() == detector.get_params()
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\]"):
        detector.set_params(epoch=3)
    with pytest.raises(ValueError, match="epochs"):
        detector.set_params(epochs=-1)
    assert detector.epochs == 7  # a refused change leaves the detector as it was


def test_repr_shows_the_changed_parameters():
    assert repr(CPCAD(epochs=3, widths=(8, 16, 32))) == "CPCAD(epochs=3, widths=(8, 16, 32))"
    assert repr(AnoMem()) == "AnoMem()"


def test_set_params_keeps_the_fitted_model(cpcad, data):
    scores = cpcad.decision_function(data[2][:2])
    cpcad.set_params(test_draws=cpcad.test_draws)
    np.testing.assert_array_equal(cpcad.decision_function(data[2][:2]), scores)


def test_contamination_range_is_pyods():
    assert CPCAD(contamination=0.5).contamination == 0.5
    for bad in (0.0, 0.6, True):
        with pytest.raises(ValueError, match=r"contamination must be in \(0, 0.5\]"):
            CPCAD(contamination=bad)


def test_device_errors_are_one_line():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        CPCAD(device="gpu")
    if not torch.cuda.is_available():
        for cls in (CPCAD, AnoMem):
            with pytest.raises(ValueError, match="CUDA requested .* use device 'cpu' or 'auto'"):
                cls(device="cuda:5")


@pytest.mark.parametrize("which", ["cpcad", "anomem"])
def test_encoder_memory_format_is_one_switch(which, request, data, monkeypatch):
    """``_precision.ENCODER_MEMORY_FORMAT`` sets the encoder weights' layout when a model is built
    and the inputs' at every call (the bench's "nchw" case); either layout scores the same."""
    from pyanomaly.models import _precision

    detector = request.getfixturevalue(which)
    images = [sample[0] for sample in data[2][:4]]

    def convs(model):  # kernels whose two layouts differ (not 1x1, not one input channel)
        return [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]

    fitted = convs(detector.model_)
    assert fitted and all(p.is_contiguous(memory_format=torch.channels_last) for p in fitted)
    default = detector.decision_function(images)
    monkeypatch.setattr(_precision, "ENCODER_MEMORY_FORMAT", torch.contiguous_format)
    rebuilt = detector._build_model() if which == "cpcad" else detector._build_model(3, (32, 32))
    assert convs(rebuilt) and not any(p.is_contiguous(memory_format=torch.channels_last) for p in convs(rebuilt))
    np.testing.assert_allclose(detector.decision_function(images), default, rtol=1e-4, atol=1e-5)


# -- inputs -----------------------------------------------------------------------------------
def test_every_input_form_scores_the_same(cpcad, data, tmp_path):
    samples = data[2][:3]
    reference = cpcad.decision_function([s.image for s in samples])
    paths = [s.path for s in samples]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, s in enumerate(samples):
        Image.open(s.path).save(folder / f"{i}.png")
    gray = np.stack([s.image[0].numpy() for s in samples])  # (N, H, W) uint8
    rgb = np.repeat(gray[..., None], 3, axis=3)  # NHWC
    forms = {
        "paths": paths,
        "path strings": [str(p) for p in paths],
        "folder": folder,
        "glob": str(folder / "*.png"),
        "PIL": [Image.open(p) for p in paths],
        "numpy HW": list(gray),
        "numpy HWC": list(rgb),
        "numpy CHW": [g[None] for g in gray],
        "numpy NHWC": rgb,
        "float tensor": torch.from_numpy(gray[:, None]).float() / 255,
        "tensor NCHW": torch.from_numpy(gray[:, None]),
        "dataset items": samples,
    }
    for name, form in forms.items():
        np.testing.assert_allclose(cpcad.decision_function(form), reference, rtol=0, atol=0, err_msg=name)
    single = cpcad.decision_function(samples[0].image)  # one CHW tensor
    np.testing.assert_allclose(single, reference[:1], rtol=1e-5)  # batch of 1: convolutions round differently


def test_as_images_modes_and_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    expected_luma = torch.from_numpy(np.asarray(Image.fromarray(rgb).convert("L")))
    assert torch.equal(as_images(rgb, mode="gray")[0][0], expected_luma)  # Pillow's luma exactly
    assert torch.equal(as_images(tmp_path / "c.png", mode="gray")[0][0], expected_luma)
    both = as_images(tmp_path)  # own channels, mixed -> gray replicated
    assert [tuple(x.shape) for x in both] == [(3, 20, 30), (3, 20, 30)]
    assert as_images(tmp_path / "g.png")[0].shape == (1, 20, 30)
    assert as_images(rgb[..., 0], mode="rgb")[0].shape == (3, 20, 30)
    assert as_images(np.dstack([rgb, rgb[..., :1]]))[0].shape == (3, 20, 30)  # alpha dropped
    assert as_images(torch.rand(3, 8, 8), allow_float=True)[0].dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="pattern .* matches no image"):
        as_images(str(tmp_path / "*.jpg"))
    with pytest.raises(ValueError, match=r"images\[1\] is a batch"):
        as_images([rgb, np.zeros((2, 3, 8, 8), np.uint8)])
    with pytest.raises(ValueError, match="must hold uint8 or float"):
        as_images(np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match=r"is 4x8 pixels; this detector needs at least 8"):
        as_images(np.zeros((4, 8), np.uint8), min_size=8)


def test_gray_or_colour_follows_the_method(cpcad, anomem, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    # CPC-AD is gray: a colour file scores as its luma
    np.testing.assert_array_equal(cpcad.decision_function(tmp_path / "c.png"), cpcad.decision_function(gray))
    # AnoMem follows its model: fitted on gray images, a colour input is converted the same way
    assert anomem.in_channels_ == 1
    np.testing.assert_array_equal(anomem.decision_function(tmp_path / "c.png"), anomem.decision_function(gray))


def test_fit_y_leaves_out_or_uses_anomalies(data):
    train = [data[1][i].image for i in range(8)]
    defect = [s.image for s in data[2] if s.label == 1][:2]
    y = [0] * 8 + [1] * 2
    a = CPCAD(**{**CPCAD_TINY, "epochs": 1}).fit(train + defect, y)
    b = CPCAD(**{**CPCAD_TINY, "epochs": 1}).fit(train)
    np.testing.assert_array_equal(a.decision_scores_, b.decision_scores_)
    semi = AnoMem(**ANOMEM_TINY).fit(train + defect, y)
    assert semi.semi_supervised_


# -- thresholds and outputs --------------------------------------------------------------------
def test_threshold_policies(cpcad, data):
    samples = data[2]
    images, labels = [s.image for s in samples], np.array([s.label for s in samples])
    scores = cpcad.decision_function(images)
    detector = cpcad
    detector.fit_threshold(images, labels)
    predicted = detector.predict(images)
    best_f1, _ = f1_max(labels, scores)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    assert f1 == pytest.approx(best_f1)
    normal = [im for im, y in zip(images, labels) if y == 0]
    detector.fit_threshold(normal, fpr=0.2)
    assert detector.predict(normal).mean() <= 0.2 + 1e-9
    detector.set_threshold(1e9, pixel=1e9)
    assert detector.predict(images).sum() == 0
    assert not np.any(detector.predict_masks(images[:2]))
    masks = np.stack([s.mask.numpy() for s in samples])
    detector.fit_threshold(images, labels, masks=masks)
    _, best_pixel = f1_max(masks, np.stack(detector.score(images)[1]))
    assert detector.pixel_threshold_ == pytest.approx(best_pixel)
    assert detector.predict_masks(images).shape == masks.shape
    with pytest.raises(ValueError, match="labels must be"):
        detector.fit_threshold(images, labels[:3])
    with pytest.raises(ValueError, match="fpr must be in"):
        detector.fit_threshold(images, fpr=1.5)
    with pytest.raises(ValueError, match="image threshold must be a finite number"):
        detector.set_threshold(float("nan"))


@pytest.mark.parametrize("which", ["cpcad", "anomem"])
def test_predict_proba_range_and_order(which, request, data):
    detector = request.getfixturevalue(which)
    images = [s.image for s in data[2]]
    scores = detector.decision_function(images)
    order = np.argsort(scores)
    for method in ("linear", "unify"):
        proba = detector.predict_proba(images, method=method)
        assert proba.shape == (len(images), 2) and np.all((proba >= 0) & (proba <= 1))
        np.testing.assert_allclose(proba.sum(1), 1.0)
        assert np.all(np.diff(proba[order, 1]) >= 0)  # monotone in the score
    with pytest.raises(ValueError, match="method must be one of"):
        detector.predict_proba(images, method="rank")


@pytest.mark.parametrize("which", ["cpcad", "anomem"])
def test_normalised_maps_use_fit_statistics(which, request, data):
    detector = request.getfixturevalue(which)
    images = [s.image for s in data[2]]
    together = detector.anomaly_map(images, normalize=True)
    alone = detector.anomaly_map(images[:1], normalize=True)
    np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-5)  # not min-max per call
    assert detector.map_low_ < detector.pixel_threshold_


# -- files ------------------------------------------------------------------------------------
def test_saved_file_records_versions_and_checksum(cpcad, tmp_path):
    import pyanomaly

    path = tmp_path / "model.pt"
    cpcad.save(path)
    outer = torch.load(path, weights_only=True)
    assert outer["pyanomaly_version"] == pyanomaly.__version__ and outer["torch_version"] == str(torch.__version__)
    assert len(outer["sha256"]) == 64
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    loaded = Detector.load(path)
    assert type(loaded) is CPCAD and loaded.pixel_threshold_ == cpcad.pixel_threshold_


def test_flipped_bits_are_refused(cpcad, tmp_path):
    path = tmp_path / "model.pt"
    cpcad.save(path)
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 4096] = bytes(b ^ 0xFF for b in raw[middle : middle + 4096])
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.pt.* (is damaged|not a readable pyanomaly model)"):
        CPCAD.load(path)


def test_interrupted_save_leaves_old_file_and_no_stray(cpcad, tmp_path):
    path = tmp_path / "model.pt"
    cpcad.save(path)
    before = path.read_bytes()
    stray = tmp_path / ".model.pt.abc123.tmp"  # what a SIGKILL during save leaves behind
    stray.write_bytes(b"partial")
    assert path.read_bytes() == before
    CPCAD.load(path)
    assert not stray.exists()
    stray.write_bytes(b"partial")
    cpcad.save(path)
    assert not stray.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_format_1_files_still_load(cpcad, tmp_path):
    """Files written before the checksum (format 1: the payload dict itself) load; masks need a
    pixel threshold they did not store, and say so."""
    from pyanomaly.models.base import _to_cpu

    payload = {
        "format": "pyanomaly", "format_version": 1, "method": "cpcad", "config": cpcad.config(),
        "threshold": cpcad.threshold_, "decision_scores": torch.as_tensor(cpcad.decision_scores_),
        "state": _to_cpu(cpcad._get_state()),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = tmp_path / "old.pt"
    path.write_bytes(buffer.getvalue())
    old = CPCAD.load(path)
    image = [np.zeros((64, 64), np.uint8)]
    np.testing.assert_array_equal(old.decision_function(image), cpcad.decision_function(image))
    with pytest.raises(RuntimeError, match="no pixel statistics .* fit_threshold"):
        old.predict_masks(image)


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    torch.save({"format": "pyanomaly", "format_version": 99, "pyanomaly_version": "9.0"}, path)
    with pytest.raises(ValueError, match="format version 99 .*9.0.*upgrade pyanomaly"):
        Detector.load(Path(path))


# -- resumable fits ---------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _stop_after(epoch):
    def hook(detector, record):
        if record["epoch"] == epoch:
            raise _Stop

    return hook


@pytest.mark.parametrize("cls, kwargs", [
    (CPCAD, {**CPCAD_TINY, "crop_fraction": 2 / 3}),
    (AnoMem, {**ANOMEM_TINY, "epochs": 3}),
    (AnoMem, {**ANOMEM_TINY, "epochs": 3, "precision": "bf16"}),  # a resumed bf16 fit stays bf16
])
def test_an_interrupted_fit_resumes_to_the_same_parameters(cls, kwargs, data, tmp_path):
    """Seeded CPU fit stopped after epoch 2 (checkpoint every epoch) and resumed == uninterrupted."""
    images = [data[1][i].image for i in range(12)]
    epochs = kwargs["epochs"]
    whole = cls(**kwargs).fit(images)
    interrupted = cls(**kwargs, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    with pytest.raises(_Stop):
        interrupted.fit(images, on_epoch_end=_stop_after(2))
    assert (tmp_path / f"{cls.method}-checkpoint.pt").is_file()
    resumed = cls(**kwargs, checkpoint_every=1, checkpoint_dir=str(tmp_path)).fit(images, resume=tmp_path)
    for (name, a), b in zip(whole.model_.state_dict().items(), resumed.model_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert len(resumed.history_) == epochs
    np.testing.assert_array_equal(resumed.decision_scores_, whole.decision_scores_)
    with pytest.raises(ValueError, match="other settings .*lr"):
        cls(**{**kwargs, "lr": 0.5}).fit(images, resume=tmp_path)
    with pytest.raises(ValueError, match="resume with the same data"):
        cls(**kwargs).fit(images[:8], resume=tmp_path)


def test_cli_resume(tmp_path, data, capsys):
    from pyanomaly import cli

    root = data[0]
    run = tmp_path / "run"
    tiny = ["--image-size", "64", "--patch-size", "32", "--patch-stride", "16", "--sub-size", "8", "--sub-stride", "4",
            "--widths", "[8, 16, 32]", "--blocks", "[1, 1, 1]", "--prediction-steps", "2", "--quiet"]
    assert cli.main(["fit", "--data", str(root), "--category", "synthetic", "--out", str(run), "--epochs", "2",
                     "--checkpoint-every", "1", *tiny]) == 0
    assert (run / "fit-args.json").is_file() and (run / "cpcad-checkpoint.pt").is_file()
    (run / "model.pt").unlink()
    (run / "config.json").unlink()  # as if the fit had stopped after its last checkpoint
    assert cli.main(["fit", "--resume", str(run), "--quiet"]) == 0
    assert (run / "model.pt").is_file()
    capsys.readouterr()
    assert cli.main(["fit", "--data", str(root), "--category", "synthetic", "--out", str(run), *tiny]) == 2
    assert "already holds a run" in capsys.readouterr().err


# -- training data pipeline -------------------------------------------------------------------
LOADING_CASES = [(CPCAD, {**CPCAD_TINY, "epochs": 2, "crop_fraction": 2 / 3}), (AnoMem, {**ANOMEM_TINY, "epochs": 2, "seed": 3})]


def _same_parameters(a, b):
    for (name, x), y in zip(a.model_.state_dict().items(), b.model_.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("cls, kwargs", LOADING_CASES)
def test_a_seeded_fit_is_the_same_with_any_number_of_workers_and_with_or_without_the_cache(cls, kwargs, data):
    """Crops and flips come from per-image generators seeded by (seed, epoch, image): reading in 2
    worker processes, or from disk every epoch instead of a cache, trains the same parameters."""
    files = sorted(str(p) for p in (data[0] / "synthetic" / "train" / "good").iterdir())[:12]
    reference = cls(**kwargs).fit(files)
    _same_parameters(reference, cls(**kwargs, num_workers=2).fit(files))
    _same_parameters(reference, cls(**kwargs, cache_images=False).fit(files))
    _same_parameters(reference, cls(**kwargs, cache_images=True, num_workers=1).fit(files))
    np.testing.assert_array_equal(reference.decision_scores_, cls(**kwargs, cache_images=False).fit(files).decision_scores_)


@pytest.mark.parametrize("cls, kwargs", LOADING_CASES)
def test_training_files_are_read_every_epoch_unless_cached(cls, kwargs, data, monkeypatch):
    import pyanomaly.data._sources as sources

    files = sorted(str(p) for p in (data[0] / "synthetic" / "train" / "good").iterdir())[:8]
    reads = []
    real_one = sources._one
    monkeypatch.setattr(sources, "_one", lambda item, *a: reads.append(item) or real_one(item, *a))
    cls(**kwargs, cache_images=True).fit(files)
    assert len(reads) == len(files)  # decoded once
    reads.clear()
    cls(**kwargs, cache_images=False).fit(files)
    epochs = kwargs["epochs"]
    assert len(reads) >= epochs * len(files) and {str(r) for r in reads} == set(files)


def test_image_source_reads_lazily_and_names_bad_files(tmp_path):
    from pyanomaly.data._sources import ImageSource

    paths = []
    for i, size in enumerate([(20, 30), (16, 16)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full(size, 10 * i, np.uint8)).save(paths[-1])
    source = ImageSource([str(p) for p in paths], "data", mode="gray", cache=False)
    assert not source.cached and source.sizes == [(20, 30), (16, 16)] and len(source) == 2
    assert source[1].shape == (1, 16, 16) and int(source[1][0, 0, 0]) == 10
    assert [tuple(x.shape) for x in source[0:2]] == [(1, 20, 30), (1, 16, 16)]
    assert source.subset([1]).sizes == [(16, 16)] and ImageSource(paths, "data", mode="rgb", cache=True)[0].shape == (3, 20, 30)
    with pytest.raises(ValueError, match=r"1\.png is 16x16 pixels; this detector needs at least 17"):
        ImageSource([str(p) for p in paths], "data", mode="gray", min_size=17, cache=False)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(paths[1])
    with pytest.raises(ValueError, match=r"1\.png changed on disk"):
        source[1]
    with pytest.raises(ValueError, match="cache"):
        ImageSource(paths, cache="sometimes")


@pytest.mark.parametrize("cls, kwargs", [(CPCAD, CPCAD_TINY), (AnoMem, ANOMEM_TINY)])
@pytest.mark.parametrize("bad, match", [({"num_workers": -1}, "num_workers"), ({"num_workers": 1.5}, "num_workers"),
                                        ({"cache_images": "yes"}, "cache_images")])
def test_bad_data_loading_arguments_name_the_argument(cls, kwargs, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(**{**kwargs, **bad})


def test_folder_datasets_are_read_from_their_files(data):
    from pyanomaly.data import FolderDataset
    from pyanomaly.data._sources import ImageSource

    train = data[1]
    lazy = ImageSource(train, "data", cache=False)
    assert not lazy.cached and len(lazy) == len(train) and lazy.channels == 1  # the dataset's grayscale setting
    assert torch.equal(lazy[3], train[3].image)
    colour = ImageSource(FolderDataset(data[0] / "synthetic" / "train" / "good", grayscale=False), "data", cache=True)
    assert colour.cached and colour[0].shape[0] == 3


def test_cache_images_takes_the_command_line_text():
    assert CPCAD(**{**CPCAD_TINY, "cache_images": "false"}).cache_images is False
    assert AnoMem(**{**ANOMEM_TINY, "cache_images": "True"}).cache_images is True


@pytest.mark.parametrize(
    "flags, warns",
    [(frozenset({"avx2"}), True), (frozenset({"avx2", "avx512_bf16"}), False),
     (frozenset({"amx_bf16"}), False), (frozenset(), False)],
)
def test_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, flags, warns):
    """precision="bf16" on a CPU whose flags show no bf16 instructions: one warning that says it is
    emulated and what to pick instead; unknown flags (empty) and bf16 CPUs stay silent."""
    import warnings

    import pyanomaly.models._precision as precision_module

    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: flags)
    precision_module._warn_emulated_bf16.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert precision_module.resolve_precision("bf16", "cpu") == "bf16"
        assert precision_module.resolve_precision("auto", "cpu") == "fp32"
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == (1 if warns else 0), messages
    if warns:
        assert "precision='bf16'" in messages[0] and "emulates" in messages[0] and "'fp32'" in messages[0]
    precision_module._warn_emulated_bf16.cache_clear()
