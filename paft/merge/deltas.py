"""Task vectors ("deltas"): what an input changed relative to the base, keyed by the base's weight names.

An input is either a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
or a full fine-tuned model folder (safetensors, single file or sharded). Deltas are returned as float32.

A full model's delta ``tuned - base`` is formed in ``dtype``: ``"float32"`` (the default here: both cast to
float32 first, so the difference is exact) or ``"input"``: in the tensors' own dtype (their promoted dtype
if they differ), e.g. a bf16 subtraction for bf16 models, rounded to bf16. ``"input"`` is what mergekit
does (unless its config sets ``dtype``), and it decides which entries a top-k by ``|delta|`` keeps:
:func:`paft.merge.merge_models` uses it by default. Any other torch dtype name casts both to it first
(mergekit's ``dtype: float32`` is ``"float32"``). LoRA deltas ``B @ A * scale`` are always float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."

# LoRA parameter suffixes in a saved adapter (the adapter name is not part of saved keys).
_LORA_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
}


# ----------------------------------------------------------------------------- safetensors folders
def weight_files(model_dir: str | Path) -> dict[str, list[str]]:
    """``{file name: [tensor names]}`` of a model folder's safetensors (single file or sharded index)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        files: dict[str, list[str]] = {}
        for name, fname in read_json(index)["weight_map"].items():
            files.setdefault(fname, []).append(name)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    raise PaftError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors model folders can be merged)")


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in its stored dtype."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fname in weight_files(model_dir):
        out.update(load_file(str(Path(model_dir) / fname)))
    return out


def is_adapter(input_dir: str | Path) -> bool:
    return (Path(input_dir) / ADAPTER_CONFIG).is_file()


# ----------------------------------------------------------------------------- LoRA
def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(cfg: dict, module: str) -> float:
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def lora_deltas(
    adapter_dir: str | Path,
    base: str | Path | Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """Full per-module deltas of a peft LoRA adapter: ``(B @ A) * scale``, keyed by base weight names.

    ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module through
    ``rank_pattern`` / ``alpha_pattern`` (peft's matching: the pattern matches the end of the module name).
    Embedding LoRA gives ``(B @ A).T * scale``, ``fan_in_fan_out`` transposes, and ``lora_bias`` adds
    ``B.bias * scale`` to the module's bias. Full weights saved with the adapter (``modules_to_save``, or
    a LoRA layer's ``base_layer`` weights) add ``saved - base``; that needs ``base`` (the base folder, or
    its weights already read); ``dtype`` is the dtype those are subtracted in (module docstring).
    """
    adapter_dir = Path(adapter_dir)
    deltas, full = _read_adapter(adapter_dir, keep_dtype=dtype != "float32")
    if full:
        if base is None:
            raise PaftError(
                f"{adapter_dir}: adapter also saved full modules ({', '.join(sorted(full))}); "
                "pass the base so they can be taken relative to it"
            )
        base = read_weights(base) if isinstance(base, (str, Path)) else base
        for name, d in _against_base(base, full, adapter_dir, dtype).items():
            deltas[name] = deltas[name] + d if name in deltas else d  # saved base_layer + its LoRA
    return deltas


def adapter_files(adapter_dir: Path) -> tuple[dict, Path]:
    """The adapter's config and weights file, refusing what a merge of B·A·scale deltas cannot represent."""
    cfg = read_json(adapter_dir / ADAPTER_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PaftError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "target_parameters", "trainable_token_indices", "layer_replication"):
        if cfg.get(key):
            raise PaftError(f"{adapter_dir}: adapter_config {key}={cfg[key]!r} is not supported")
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise PaftError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    return cfg, weights_path


def _read_adapter(
    adapter_dir: str | Path, keep_dtype: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg, weights_path = adapter_files(adapter_dir)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights_path)).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in _LORA_PARTS.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = tensor.float()
                break
        else:
            if ".lora_" in name or "trainable_tokens" in name:
                raise PaftError(f"{adapter_dir}: unsupported adapter tensor {key!r}")
            # modules_to_save (the module's trained weights), or a LoRA layer's own weights that peft
            # saved too (``<module>.base_layer.weight``, e.g. with save_embedding_layers)
            full[name.replace(".base_layer.", ".")] = tensor if keep_dtype else tensor.float()

    deltas: dict[str, torch.Tensor] = {}
    for module, p in sorted(parts.items()):
        scale = _scale(cfg, module)
        if "A" in p and "B" in p:
            delta = p["B"] @ p["A"]
            if cfg.get("fan_in_fan_out"):
                delta = delta.T
            deltas[f"{module}.weight"] = (delta * scale).contiguous()
            if "B_bias" in p:
                deltas[f"{module}.bias"] = p["B_bias"] * scale
        elif "emb_A" in p and "emb_B" in p:
            deltas[f"{module}.weight"] = ((p["emb_B"] @ p["emb_A"]).T * scale).contiguous()
        else:
            raise PaftError(f"{adapter_dir}: module {module!r} has an incomplete LoRA pair ({sorted(p)})")
    return deltas, full


# ----------------------------------------------------------------------------- full models
def missing_in_base(name: str, input_dir: str | Path) -> PaftError:
    hint = " (a base with tied embeddings stores only the input embeddings)" if name.startswith("lm_head.") else ""
    return PaftError(f"{input_dir}: delta for {name!r} has no matching tensor in the base model{hint}")


DELTA_DTYPES = ("input", "float32", "float64", "bfloat16", "float16")


def check_delta_dtype(dtype: str) -> str:
    if dtype not in DELTA_DTYPES:
        raise PaftError(f"unknown delta dtype {dtype!r}; known: {', '.join(DELTA_DTYPES)}")
    return dtype


def delta_of(tuned: torch.Tensor, base: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """``tuned - base`` formed in ``dtype`` (``"input"``: the tensors' promoted dtype), as float32."""
    dt = torch.promote_types(tuned.dtype, base.dtype) if dtype == "input" else getattr(torch, dtype)
    return (tuned.to(dt) - base.to(dt)).float()


def _against_base(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], input_dir: Path, dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    check_delta_dtype(dtype)
    deltas = {}
    for name, t in tuned.items():
        if name not in base:
            raise missing_in_base(name, input_dir)
        if t.shape != base[name].shape:
            raise PaftError(
                f"{input_dir}: tensor {name!r} has shape {tuple(t.shape)}, base has {tuple(base[name].shape)}"
            )
        deltas[name] = delta_of(t, base[name], dtype)
    return deltas


def full_deltas(base_dir: str | Path, model_dir: str | Path, *, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``finetuned - base`` for every tensor of a full fine-tuned model folder (formed in ``dtype``)."""
    return _against_base(read_weights(base_dir), read_weights(model_dir), Path(model_dir), dtype)


def load_deltas(
    base_dir: str | Path,
    input_dir: str | Path,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """Deltas of an adapter folder (if it has ``adapter_config.json``) or of a full model folder.

    ``base`` (the base weights, if already read) avoids reading them again; ``dtype``: what full
    tensors are subtracted in (module docstring).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise PaftError(f"{input_dir}: merge input folder does not exist")
    if is_adapter(input_dir):
        return lora_deltas(input_dir, base_dir if base is None else base, dtype=dtype)
    base = read_weights(base_dir) if base is None else base
    return _against_base(base, read_weights(input_dir), input_dir, dtype)
