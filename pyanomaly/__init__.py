"""pyanomaly: image anomaly detection and segmentation (CPC-AD, AnoMem) with fused C++/CUDA ops."""

__version__ = "0.1.0"

from pyanomaly import _ext, ops  # noqa: E402
from pyanomaly.export import Inferencer  # noqa: E402
from pyanomaly.models import CPCAD, AnoMem  # noqa: E402

__all__ = ["CPCAD", "AnoMem", "Inferencer", "ops", "__version__"]
