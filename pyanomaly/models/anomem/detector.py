"""AnoMem detector (placeholder until the AnoMem issue lands)."""


class AnoMem:
    """Anomaly detection via multi-scale contrasted memory (Jezequel et al.). Not built yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("AnoMem is not implemented yet")
