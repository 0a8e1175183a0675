"""CPC-AD: Contrastive Predictive Coding for anomaly detection and segmentation."""

from pyanomaly.models.cpcad.detector import CPCAD, LAYOUTS
from pyanomaly.models.cpcad.torch_model import DIRECTIONS, CPCADModel

__all__ = ["CPCAD", "CPCADModel", "DIRECTIONS", "LAYOUTS"]
