"""Task vectors ("deltas"): what an input changed relative to the base, keyed by the base's weight names.

An input is either a peft LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
or a full fine-tuned model folder (safetensors, single file or sharded). :func:`delta_items` lists an input's
deltas without reading them (each is computed when loaded, tensors memory-mapped: see
:mod:`paft.merge.tensors`); :func:`load_deltas` and friends read them all, as float32.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import read_json
from paft.merge.tensors import INDEX_FILE, SINGLE_FILE, ModelWeights, SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# LoRA parameter suffixes in a saved adapter (the adapter name is not part of saved keys).
_LORA_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
}
DELTA_DTYPES = ("input", "float32", "float64", "bfloat16", "float16")

__all__ = ["INDEX_FILE", "SINGLE_FILE", "DeltaItem", "delta_items", "full_deltas", "load_deltas", "lora_deltas"]


def weight_files(model_dir: str | Path) -> dict[str, list[str]]:
    """``{file name: [tensor names]}`` of a model folder's safetensors (single file or sharded index)."""
    return ModelWeights(model_dir).layout()


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in its stored dtype."""
    weights = ModelWeights(model_dir)
    return {name: weights.get(name).clone() for name in weights.names()}


def is_adapter(input_dir: str | Path) -> bool:
    return (Path(input_dir) / ADAPTER_CONFIG).is_file()


def check_delta_dtype(dtype: str) -> str:
    if dtype not in DELTA_DTYPES:
        raise PaftError(f"unknown delta dtype {dtype!r}; known: {', '.join(DELTA_DTYPES)}")
    return dtype


def delta_of(tuned: torch.Tensor, base: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """``tuned - base`` formed in ``dtype`` (``"input"``: the tensors' promoted dtype), in that dtype."""
    dt = torch.promote_types(tuned.dtype, base.dtype) if dtype == "input" else getattr(torch, dtype)
    return tuned.to(dt) - base.to(dt)


def missing_in_base(name: str, input_dir: str | Path) -> PaftError:
    hint = " (a base with tied embeddings stores only the input embeddings)" if name.startswith("lm_head.") else ""
    return PaftError(f"{input_dir}: delta for {name!r} has no matching tensor in the base model{hint}")


# ----------------------------------------------------------------------------- lazy deltas
@dataclass
class DeltaItem:
    """One delta of an input, keyed by the base weight name. ``rows(r0, r1)`` computes rows ``r0:r1`` of it
    (along the first dimension; a LoRA module's rows cost a slice of B times A), ``load()`` all of it;
    ``dtype``: what it comes in (a full model's delta dtype, float32 for LoRA)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: Callable[[int, int], torch.Tensor]
    release: Callable[[], None] = lambda: None  # done with it: drop its memory-mapped pages

    def load(self) -> torch.Tensor:
        return self.rows(0, self.shape[0]) if self.shape else self.rows(0, 1)


def delta_items(
    base: ModelWeights, input_dir: str | Path, *, dtype: str = "float32", vocab_rows: tuple[int, int] | None = None
) -> list[DeltaItem]:
    """The deltas of an adapter folder (if it has ``adapter_config.json``) or a full model folder, sorted by
    name, checked against the base (names, shapes) but not read. ``dtype``: what full tensors are subtracted
    in (module docstring). ``vocab_rows`` (the base's and the input's vocabulary sizes): a tensor with as many
    rows as the input's vocabulary where the base's has the base's (embeddings, output head), otherwise of
    the same shape, gets its delta cut or zero-padded to the base's rows instead of refused."""
    input_dir = Path(input_dir)
    check_delta_dtype(dtype)
    if not input_dir.is_dir():
        raise PaftError(f"{input_dir}: merge input folder does not exist")
    if is_adapter(input_dir):
        items = _adapter_items(base, input_dir, dtype)
    else:
        tuned = ModelWeights(input_dir)
        items = [_full_item(base, tuned, name, dtype) for name in tuned.names()]
    for i, it in enumerate(items):
        if it.name not in base:
            raise missing_in_base(it.name, input_dir)
        want = base.shape(it.name)
        if it.shape == want:
            continue
        if not (vocab_rows and (want[0], it.shape[0]) == vocab_rows and it.shape[1:] == want[1:]):
            hint = "; a vocabulary of another size? (allow_vocab_mismatch merges the shared rows)" if (
                len(it.shape) == len(want) > 1 and it.shape[1:] == want[1:]) else ""
            raise PaftError(
                f"{input_dir}: tensor {it.name!r} has shape {tuple(it.shape)}, base has {tuple(want)}{hint}"
            )
        items[i] = DeltaItem(it.name, want, it.dtype, lambda r0, r1, it=it: _fit_rows(it, r0, r1), it.release)
    return items


def _fit_rows(item: DeltaItem, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of ``item`` cut or zero-padded to another number of rows (vocabulary sizes)."""
    have = item.shape[0]
    inner = item.rows(min(r0, have), min(r1, have))
    if r1 <= have:
        return inner
    return torch.cat([inner, inner.new_zeros((r1 - max(r0, have), *item.shape[1:]))])


def _full_item(base: ModelWeights, tuned: ModelWeights, name: str, dtype: str) -> DeltaItem:
    dt = torch.promote_types(tuned.dtype(name), base.dtype(name) if name in base else tuned.dtype(name))
    return DeltaItem(
        name,
        tuned.shape(name),
        dt if dtype == "input" else getattr(torch, dtype),
        lambda r0, r1: delta_of(tuned.get(name)[r0:r1], base.get(name)[r0:r1], dtype),
        lambda: tuned.release(name),
    )


def _scale(cfg: dict, module: str) -> float:
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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


def _adapter_items(base: ModelWeights | None, adapter_dir: Path, dtype: str) -> list[DeltaItem]:
    """A LoRA adapter's deltas: ``(B @ A) * scale`` per module, keyed by base weight names.

    ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module through
    ``rank_pattern`` / ``alpha_pattern`` (peft's matching: the pattern matches the end of the module name).
    Embedding LoRA gives ``(B @ A).T * scale``, ``fan_in_fan_out`` transposes, and ``lora_bias`` adds
    ``B.bias * scale`` to the module's bias. Full weights saved with the adapter (``modules_to_save``, or a
    LoRA layer's ``base_layer`` weights) add ``saved - base`` (subtracted in ``dtype``).
    """
    cfg, weights_path = adapter_files(adapter_dir)
    f = SafetensorsFile(weights_path)

    def shape(key: str) -> tuple[int, ...]:
        return f.entries[key][1]

    def get(key: str) -> torch.Tensor:
        return f.tensor(key).float()

    parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in f.entries:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in _LORA_PARTS.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = key
                break
        else:
            if ".lora_" in name or "trainable_tokens" in name:
                raise PaftError(f"{adapter_dir}: unsupported adapter tensor {key!r}")
            # modules_to_save (the module's trained weights), or a LoRA layer's own weights that peft
            # saved too (``<module>.base_layer.weight``, e.g. with save_embedding_layers)
            full[name.replace(".base_layer.", ".")] = key

    items: dict[str, DeltaItem] = {}
    f32 = torch.float32
    for module, p in sorted(parts.items()):
        scale = _scale(cfg, module)
        if "A" in p and "B" in p:
            (out, _), (_, inp) = shape(p["B"]), shape(p["A"])
            fan = bool(cfg.get("fan_in_fan_out"))

            def lora(r0, r1, a=p["A"], b=p["B"], s=scale, fan=fan):
                if fan:  # the delta is (B @ A).T: its rows are columns of B @ A
                    return ((get(b) @ get(a)[:, r0:r1]).T * s).contiguous()
                return (get(b)[r0:r1] @ get(a)) * s

            items[f"{module}.weight"] = DeltaItem(f"{module}.weight", (inp, out) if fan else (out, inp), f32, lora)
            if "B_bias" in p:
                items[f"{module}.bias"] = DeltaItem(
                    f"{module}.bias", shape(p["B_bias"]), f32, lambda r0, r1, k=p["B_bias"], s=scale: get(k)[r0:r1] * s
                )
        elif "emb_A" in p and "emb_B" in p:
            (_, num), (dim, _) = shape(p["emb_A"]), shape(p["emb_B"])
            items[f"{module}.weight"] = DeltaItem(
                f"{module}.weight",
                (num, dim),
                f32,
                lambda r0, r1, a=p["emb_A"], b=p["emb_B"], s=scale: ((get(b) @ get(a)[:, r0:r1]).T * s).contiguous(),
            )
        else:
            raise PaftError(f"{adapter_dir}: module {module!r} has an incomplete LoRA pair ({sorted(p)})")

    if full and base is None:
        raise PaftError(
            f"{adapter_dir}: adapter also saved full modules ({', '.join(sorted(full))}); "
            "pass the base so they can be taken relative to it"
        )
    for name, key in sorted(full.items()):
        if name not in base:
            raise missing_in_base(name, adapter_dir)

        def saved(r0, r1, k=key, n=name):
            return delta_of(f.tensor(k)[r0:r1], base.get(n)[r0:r1], dtype).float()

        if name in items:  # a LoRA layer's saved base_layer weights plus its LoRA
            lora_rows = items[name].rows
            items[name] = DeltaItem(name, shape(key), f32, lambda r0, r1, s=saved, lo=lora_rows: s(r0, r1) + lo(r0, r1))
        else:
            items[name] = DeltaItem(name, shape(key), f32, saved)
    return [items[n] for n in sorted(items)]


# ----------------------------------------------------------------------------- all at once
def load_deltas(
    base_dir: str | Path,
    input_dir: str | Path,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """Every delta of an adapter folder or a full model folder, as float32 (``dtype``: what full tensors are
    subtracted in, module docstring). ``base`` is accepted for compatibility and unused (tensors are mapped)."""
    return {it.name: it.load().float() for it in delta_items(ModelWeights(base_dir), input_dir, dtype=dtype)}


def lora_deltas(
    adapter_dir: str | Path, base: str | Path | None = None, *, dtype: str = "float32"
) -> dict[str, torch.Tensor]:
    """Full per-module deltas of a peft LoRA adapter (see :func:`_adapter_items`), float32. ``base`` (its
    folder) is needed only if the adapter also saved full modules."""
    weights = None if base is None else ModelWeights(base)
    return {it.name: it.load().float() for it in _adapter_items(weights, Path(adapter_dir), check_delta_dtype(dtype))}


def full_deltas(base_dir: str | Path, model_dir: str | Path, *, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``finetuned - base`` for every tensor of a full fine-tuned model folder (formed in ``dtype``), float32."""
    return load_deltas(base_dir, model_dir, dtype=dtype)
