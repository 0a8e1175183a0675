"""Evaluation metrics for image anomaly detection."""

from pyanomaly.metrics._metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve

__all__ = ["image_auroc", "pixel_auroc", "aupro", "pro_curve", "f1_max"]
