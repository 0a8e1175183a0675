"""Fused ops, each with a pure-PyTorch ``*_ref`` reference beside it."""

from pyanomaly._ext import huge_pages, reference_mode
from pyanomaly.ops.hopfield import hopfield_retrieve, hopfield_retrieve_ref
from pyanomaly.ops.infonce import infonce, infonce_ref, sample_negatives
from pyanomaly.ops.patches import extract_patches, extract_patches_ref, fold_patches, fold_patches_ref

__all__ = [
    "extract_patches",
    "extract_patches_ref",
    "fold_patches",
    "fold_patches_ref",
    "hopfield_retrieve",
    "hopfield_retrieve_ref",
    "huge_pages",
    "infonce",
    "infonce_ref",
    "reference_mode",
    "sample_negatives",
]
