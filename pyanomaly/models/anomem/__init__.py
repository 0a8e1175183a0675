"""AnoMem: anomaly detection via multi-scale contrasted memory (detector, networks, augmentations)."""

from pyanomaly.models.anomem.detector import AnoMem
from pyanomaly.models.anomem.torch_model import AnoMemModel

__all__ = ["AnoMem", "AnoMemModel"]
