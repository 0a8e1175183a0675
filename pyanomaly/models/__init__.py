"""The detectors: CPC-AD and AnoMem."""

from pyanomaly.models.anomem import AnoMem
from pyanomaly.models.cpcad import CPCAD

__all__ = ["CPCAD", "AnoMem"]
