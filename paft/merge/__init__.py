"""Merge engine: task vectors from LoRA adapters or full models, combined by a registered method.

Methods (mergekit 0.1.5's semantics, cross-checked in tests/test_merge_mergekit.py): linear, task_arithmetic,
ties, dare_linear, dare_ties, magnitude_prune; see :mod:`paft.merge.methods`.
"""

from paft.merge.deltas import full_deltas, load_deltas, lora_deltas
from paft.merge.io import MergeInput, merge_models
from paft.merge.methods import METHODS, MethodSpec, get_method, merge_tensor

__all__ = [
    "METHODS",
    "MergeInput",
    "MethodSpec",
    "full_deltas",
    "get_method",
    "load_deltas",
    "lora_deltas",
    "merge_models",
    "merge_tensor",
]
