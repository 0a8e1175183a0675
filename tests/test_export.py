"""Export (ONNX, torch.export) and the Inferencer: the same scores and maps as ``detector.score()``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyanomaly import AnoMem, CPCAD
from pyanomaly.export import OPSET, Inferencer

CPCAD_TINY = dict(image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(8, 16, 32),
                  blocks=(1, 1, 1), shared_encoder=True, prediction_steps=2, crop_fraction=1.0, epochs=1,
                  test_draws=2, verbose=False, score_norm="position", seed=0)
ANOMEM_TINY = dict(backbone="resnet18", width=8, memory_sizes=(16, 8), epochs=1, batch_size=8, classifier_epochs=3,
                   verbose=False, seed=0)


def _images(n, c, size, seed):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def detectors():
    torch.set_num_threads(1)
    cpcad = CPCAD(**CPCAD_TINY).fit(_images(10, 1, 64, 0))
    one_class = AnoMem(**ANOMEM_TINY).fit(_images(16, 3, 32, 1))
    semi = AnoMem(**ANOMEM_TINY).fit(_images(16, 3, 32, 1), anomalies=_images(4, 3, 32, 2))
    combined = CPCAD(**{**CPCAD_TINY, "anomaly_score": "combined", "infonce_sides": "both"}).fit(_images(10, 1, 64, 0))  # the cpu preset's score
    return {"cpcad": (cpcad, _images(5, 1, 64, 3)), "cpcad-combined": (combined, _images(5, 1, 64, 3)),
            "anomem": (one_class, _images(5, 3, 32, 4)),
            "anomem-semi": (semi, _images(5, 3, 32, 4))}


def _close(expected_scores, expected_maps, scores, maps):
    scale = np.abs(expected_scores).max()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4 * scale)
    maps, expected = np.stack(maps), np.stack(expected_maps)
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["cpcad", "cpcad-combined", "anomem", "anomem-semi"])
def test_onnx_matches_score_with_a_dynamic_batch(name, detectors, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    detector, images = detectors[name]
    path = detector.export(tmp_path / "model", "onnx")
    assert path.suffix == ".onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == OPSET
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # standard operators only
    expected_scores, expected_maps = detector.score(images)
    inferencer = Inferencer(path)
    for n in (1, 5):
        _close(expected_scores[:n], expected_maps[:n], *inferencer.score(images[:n]))
    np.testing.assert_array_equal(inferencer.predict(images), (inferencer.decision_function(images) > detector.threshold_))


@pytest.mark.kernels
@pytest.mark.parametrize("name", ["cpcad", "anomem"])
def test_torch_export_keeps_the_custom_ops_and_matches(name, detectors, tmp_path):
    detector, images = detectors[name]
    path = detector.export(tmp_path / "model.pt2", "torch")
    program = torch.export.load(str(path))
    targets = {str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}  # autocast regions are submodules
    if name == "cpcad":
        assert any("pyanomaly.infonce" in t for t in targets) and any("pyanomaly.extract_patches" in t for t in targets)
    else:
        assert any("pyanomaly.hopfield_retrieve" in t for t in targets)
    expected_scores, expected_maps = detector.score(images)
    inferencer = Inferencer(path)
    for n in (1, 5):
        _close(expected_scores[:n], expected_maps[:n], *inferencer.score(images[:n]))


def test_inferencer_reads_model_pt_and_resizes_any_input(detectors, tmp_path):
    detector, images = detectors["cpcad"]
    detector.save(tmp_path / "model.pt")
    inferencer = Inferencer(tmp_path, device="cpu")
    np.testing.assert_array_equal(inferencer.decision_function(images), detector.decision_function(images))
    path = detector.export(tmp_path / "model.pt2", "torch")
    from_files = Inferencer(path).predict_proba(list(images.numpy()[:, 0]))  # numpy HW images
    assert from_files.shape == (5, 2) and np.all((from_files >= 0) & (from_files <= 1))


def test_export_refuses_an_unfitted_detector(tmp_path):
    for detector in (CPCAD(**CPCAD_TINY), AnoMem(**ANOMEM_TINY)):
        with pytest.raises(RuntimeError, match="not fitted yet: fit \\(or load\\) it before exporting"):
            detector.export(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        CPCAD(**CPCAD_TINY).export(tmp_path / "m", "tflite")


def test_cli_export_and_predict_with_the_exported_file(detectors, tmp_path, capsys):
    from pyanomaly import cli

    detector, images = detectors["cpcad"]
    run = tmp_path / "run"
    run.mkdir()
    detector.save(run / "model.pt")
    assert cli.main(["export", str(run), "--format", "torch"]) == 0
    assert (run / "model.pt2").is_file()
    from PIL import Image

    Image.fromarray(images[0, 0].numpy()).save(tmp_path / "a.png")
    capsys.readouterr()
    assert cli.main(["predict", str(run / "model.pt2"), str(tmp_path / "a.png")]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(",")
    assert abs(float(row[1]) - detector.decision_function(tmp_path / "a.png")[0]) < 1e-4
