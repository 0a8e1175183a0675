from pyanomaly.models.cpcad.detector import CPCAD

__all__ = ["CPCAD"]
