"""Layers built on the fused ops, and the encoders the detectors use."""

from pyanomaly.nn.hopfield import HopfieldMemory, HopfieldRecall
from pyanomaly.nn.infonce import InfoNCE
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.nn.resnet import ResNet, resnet18, resnet50

__all__ = ["HopfieldMemory", "HopfieldRecall", "InfoNCE", "PreActResNetEncoder", "ResNet", "resnet18", "resnet50"]
