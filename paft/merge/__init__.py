"""Merge engine: task vectors from LoRA adapters or full models, combined by a registered method."""

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
