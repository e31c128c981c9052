"""Merge model folders: base + one delta per input (LoRA adapter or full model) → a standalone model folder."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import atomic_dir, write_json
from paft.merge.deltas import (
    INDEX_FILE,
    check_delta_dtype,
    is_adapter,
    load_deltas,
    missing_in_base,
    read_weights,
    weight_files,
)
from paft.merge.methods import (
    RESCALE_NORMS,
    SIGN_NAMES,
    TIE_BREAKS,
    RescaleNorm,
    TieBreak,
    combine,
    get_method,
    sign_method,
    sparsify,
    tensor_generator,
)

SUMMARY_FILE = "merge_summary.json"
# Non-weight files of the base that the merged folder needs to load and run as the base does.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
    "*.model",  # sentencepiece
)


@dataclass(frozen=True)
class MergeInput:
    """One model to merge: a LoRA adapter folder or a full fine-tuned model folder, both from the base."""

    path: str | Path
    weight: float = 1.0
    density: float = 1.0  # share of the delta kept (methods that sparsify, e.g. ties); 1 keeps all


def _check_inputs(base_dir: Path, inputs: list[MergeInput], out_dir: Path) -> None:
    if not inputs:
        raise PaftError("merge needs at least one input")
    if not (base_dir / "config.json").is_file():
        raise PaftError(f"{base_dir}: base model folder has no config.json")
    for inp in inputs:
        if not math.isfinite(inp.weight):
            raise PaftError(f"{inp.path}: merge weight must be finite, got {inp.weight}")
        if not 0 < inp.density <= 1:
            raise PaftError(f"{inp.path}: merge density must be in (0, 1], got {inp.density}")
    for p in [base_dir, *(Path(i.path) for i in inputs)]:
        if p.resolve() == out_dir.resolve():
            raise PaftError(f"{out_dir}: the merge output folder must differ from the base and the inputs")


def merge_models(
    base_dir: str | Path,
    inputs: list[MergeInput],
    method: str,
    out_dir: str | Path,
    *,
    lambda_: float = 1.0,
    normalize: bool | None = None,
    seed: int = 0,
    rescale: bool | None = None,
    rescale_norm: RescaleNorm = "l1",
    sign: str | None = None,
    tie_break: TieBreak = "sort",
    delta_dtype: str = "input",
) -> dict:
    """Merge ``inputs`` into ``base_dir`` with ``method``; write ``out_dir`` atomically; return the summary.

    Options (mergekit's parameters of the same name, see :mod:`paft.merge.methods`): ``normalize``
    and ``rescale`` (None: the method's default), ``rescale_norm`` (``l1``: mergekit's norm-preserving
    rescale; ``density``: DARE's ``1 / density``), ``lambda_``, ``sign`` (majority sign method of ties /
    dare_ties: ``total`` (default) or ``frequency``), ``seed`` (DARE's masks: one generator per tensor
    and input, from a hash of seed, input index and tensor name), ``tie_break`` (entries tied at a
    top-k threshold: ``sort``, mergekit's choice; ``index``, lowest index first), ``delta_dtype``
    (``input``: a full model's delta is formed in the tensors' dtype, e.g. bf16, as mergekit does by
    default; ``float32``: exact float32 difference, mergekit's ``dtype: float32``).

    Tensors that no input changes are copied unchanged (except ``linear`` without normalize, whose
    weights do not sum to 1: it scales every tensor, as mergekit's ``sum_i w_i m_i``); an input without a
    delta for a tensor that another input changes counts as a zero delta there (as a full model equal to
    the base would). Arithmetic is float32; each merged tensor is stored in the base tensor's dtype, in
    the base's file layout (same shards and index), so weight tying and tensor names stay as the base
    has them.
    """
    spec = get_method(method)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_inputs(base_dir, inputs, out_dir)
    normalize = spec.default_normalize if normalize is None else bool(normalize)
    consensus = sign_method(spec, sign)
    if rescale_norm not in RESCALE_NORMS:
        raise PaftError(f"unknown rescale norm {rescale_norm!r}; known: {', '.join(RESCALE_NORMS)}")
    if tie_break not in TIE_BREAKS:
        raise PaftError(f"unknown tie_break {tie_break!r}; known: {', '.join(TIE_BREAKS)}")
    check_delta_dtype(delta_dtype)
    rescale = (spec.default_rescale if rescale is None else bool(rescale)) if spec.sparsification else None

    files = weight_files(base_dir)
    base = read_weights(base_dir)
    deltas: list[dict[str, torch.Tensor]] = []
    for inp in inputs:
        d = load_deltas(base_dir, inp.path, base, dtype=delta_dtype)
        for name, t in d.items():
            if name not in base:
                raise missing_in_base(name, inp.path)
            if t.shape != base[name].shape:
                raise PaftError(
                    f"{inp.path}: delta for {name!r} has shape {tuple(t.shape)}, "
                    f"base has {tuple(base[name].shape)}"
                )
        deltas.append(d)

    names = set().union(*deltas)
    if spec.of_models and not normalize and sum(i.weight for i in inputs) != 1:
        names |= {n for n, t in base.items() if t.is_floating_point()}
    stats = [{"tensors": 0, "params": 0, "nonzero": 0, "kept": 0} for _ in inputs]
    merged: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        b = base[name]
        trimmed = []
        for i, (inp, d) in enumerate(zip(inputs, deltas, strict=True)):
            t = d.get(name)
            if t is None:
                trimmed.append(torch.zeros(b.shape, dtype=torch.float32))
                continue
            s = sparsify(
                spec,
                t,
                inp.density,
                rescale=rescale,
                rescale_norm=rescale_norm,
                tie_break=tie_break,
                generator=tensor_generator(seed, name, i) if spec.sparsification == "random" else None,
            )
            st = stats[i]
            st["tensors"] += 1
            st["params"] += t.numel()
            st["nonzero"] += int(torch.count_nonzero(t))
            st["kept"] += int(torch.count_nonzero(s))
            trimmed.append(s)
        mixed = combine(
            spec, trimmed, [i.weight for i in inputs], normalize=normalize, lambda_=lambda_, sign=consensus, base=b
        )
        merged[name] = (b.float() + mixed).to(b.dtype)

    summary = {
        "method": spec.name,
        "reference": spec.reference,
        "base": str(base_dir),
        "inputs": [
            {
                "path": str(inp.path),
                "kind": "lora" if is_adapter(inp.path) else "full",
                "weight": inp.weight,
                "density": inp.density,
                "tensors": st["tensors"],
                "params": st["params"],
                # share of zero entries in the input's deltas, as read and after the method's sparsification
                "raw_sparsity": 1 - st["nonzero"] / st["params"] if st["params"] else None,
                "sparsity": 1 - st["kept"] / st["params"] if st["params"] else None,
            }
            for inp, st in zip(inputs, stats, strict=True)
        ],
        "lambda": lambda_,
        "normalize": normalize,
        # options of the methods that use them (None where the method has no such step)
        "rescale": rescale,
        "rescale_norm": rescale_norm if rescale else None,
        "sign": SIGN_NAMES[consensus] if consensus else None,
        "tie_break": tie_break if spec.sparsification == "magnitude" else None,
        "delta_dtype": delta_dtype,
        "seed": seed,
        "mergekit": spec.mergekit,
        "tensors_merged": len(merged),
        "tensors_copied": len(base) - len(merged),
    }

    with atomic_dir(out_dir) as tmp:
        _write_weights(base_dir, files, base, merged, tmp)
        for pattern in COPIED_FILES:
            for f in base_dir.glob(pattern):
                if f.is_file() and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        write_json(tmp / SUMMARY_FILE, summary)
    return summary


def _write_weights(
    base_dir: Path,
    files: dict[str, list[str]],
    base: dict[str, torch.Tensor],
    merged: dict[str, torch.Tensor],
    dest: Path,
) -> None:
    """Write the merged weights in the base's layout: same file names, same tensors per file, same index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for fname, names in files.items():
        with safe_open(str(base_dir / fname), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = {n: merged.get(n, base[n]).contiguous() for n in names}
        save_file(tensors, str(dest / fname), metadata={**metadata, "format": "pt"})
    if (base_dir / INDEX_FILE).is_file():
        shutil.copy2(base_dir / INDEX_FILE, dest / INDEX_FILE)
