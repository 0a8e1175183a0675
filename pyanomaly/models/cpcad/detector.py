"""CPC-AD detector (placeholder until the CPCAD issue lands)."""


class CPCAD:
    """Contrastive Predictive Coding for anomaly detection (de Haan and Löwe, 2021). Not built yet."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("CPCAD is not implemented yet")
