from pyanomaly.models.anomem.detector import AnoMem

__all__ = ["AnoMem"]
