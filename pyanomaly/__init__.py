"""pyanomaly: image anomaly detection and segmentation (CPC-AD, AnoMem) with fused C++/CUDA ops."""

from pyanomaly import _ext, ops
from pyanomaly.models import CPCAD, AnoMem

__version__ = "0.1.0"
__all__ = ["CPCAD", "AnoMem", "ops", "__version__"]
