"""The package imports, reports its build, and falls back to the references without kernels."""

import subprocess
import sys

import pytest
import torch

import pyanomaly
from pyanomaly import _ext


def test_top_level_imports():
    from pyanomaly import CPCAD, AnoMem  # noqa: F401

    assert pyanomaly.ops.extract_patches is not None


def test_kernels_loaded_for_this_torch():
    """The build check: fails (where the ``kernels``-marked tests skip) when the kernels are missing."""
    assert _ext.load_error() is None, _ext.load_error()
    info = _ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert _ext.has_kernels("cpu")
    assert all(hasattr(torch.ops.pyanomaly, name) for name in _ext.EXPECTED_OPS)


def test_info_command_reports_build(tmp_path):
    # cwd outside the source checkout, so the installed package is imported
    out = subprocess.run(
        [sys.executable, "-m", "pyanomaly", "info"], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert f"torch {torch.__version__}" in out
    assert "CPU kernels: yes" in out
    assert "CUDA kernels:" in out
    assert "huge pages for large CPU patch outputs: " in out


def test_mismatched_torch_warns_once_and_falls_back_to_references(tmp_path):
    script = """
import warnings, torch
torch.__version__ = "0.0.0-other"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pyanomaly
    from pyanomaly import _ext
    images = torch.rand(2, 3, 8, 8)
    out = pyanomaly.ops.extract_patches(images, 4, 2)
    ref = pyanomaly.ops.extract_patches_ref(images, 4, 2)
    assert torch.equal(out, ref)
ours = [w for w in caught if "pyanomaly" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in ours]
message = str(ours[0].message)
assert "compiled against torch" in message and "--no-build-isolation" in message, message
assert not _ext.has_kernels("cpu")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.kernels
def test_stale_extension_missing_an_op_is_not_used(monkeypatch):
    for name in ("_C", "_load_error", "_built_with_cuda"):
        monkeypatch.setattr(_ext, name, getattr(_ext, name))  # restored after the test
    monkeypatch.setattr(_ext, "EXPECTED_OPS", (*_ext.EXPECTED_OPS, "no_such_op"))
    _ext._load()
    assert "out of date" in _ext.load_error() and "no_such_op" in _ext.load_error()
    assert not _ext.has_kernels("cpu")


def test_huge_pages_switch_without_kernels_changes_nothing(monkeypatch):
    """``pyanomaly.ops.huge_pages`` is a no-op when the extension is missing or predates the switch."""
    from pyanomaly.ops import huge_pages

    class OldExtension:  # a build from before the switch existed
        pass

    for stand_in in (None, OldExtension()):
        monkeypatch.setattr(_ext, "_C", stand_in)
        with huge_pages(False):
            pass


@pytest.mark.parametrize(
    "bits, expected", [("01100101" + "0" * 24, True), ("01100001" + "0" * 24, False), (None, False)]
)
def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path, bits, expected):
    """A virtio balloon with free page reporting (feature bit 5) turns the huge-page default off."""
    if bits is not None:
        device = tmp_path / "bus/virtio/drivers/virtio_balloon/virtio0"
        device.mkdir(parents=True)
        (device / "features").write_text(bits + "\n")
    assert _ext.host_reclaims_free_memory(str(tmp_path)) is expected
