"""Merge model folders: base + one delta per input (LoRA adapter or full model) → a standalone model folder.

The merge is streamed: tensors are memory-mapped (:mod:`paft.merge.tensors`) and merged one at a time, each
in row chunks spread over threads (:func:`paft.merge.methods.merge_into`), and written as they come, in the
base's shards. Memory holds one tensor group (the base tensor, a delta per input, the output) at a time,
not the model. Everything that can be checked before writing is (options, folders, configs, names, shapes,
adapter bases); the output is written to a temporary folder renamed into place when whole, so an error
(a non-finite value found while merging, say) leaves no output behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import atomic_dir, read_json, write_json
from paft.merge.adapter import extract_lora
from paft.merge.card import input_hashes, model_card
from paft.merge.deltas import ADAPTER_CONFIG, DeltaItem, delta_items, is_adapter
from paft.merge.methods import SIGN_NAMES, LazyDelta, NonFinite, RescaleNorm, TieBreak, merge_into, resolve
from paft.merge.select import chunks
from paft.merge.tensors import INDEX_FILE, ModelWeights, SafetensorsWriter

SUMMARY_FILE = "merge_summary.json"
CARD_FILE = "README.md"
ADAPTER_DIR = "adapter"
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
# config.json keys that must agree between the base and a full fine-tuned model (architecture and shapes)
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "head_dim", "n_embd", "n_layer", "n_head")


@dataclass(frozen=True)
class MergeInput:
    """One model to merge: a LoRA adapter folder or a full fine-tuned model folder, both from the base."""

    path: str | Path
    weight: float = 1.0
    density: float = 1.0  # share of the delta kept (methods that sparsify, e.g. ties); 1 keeps all


def _check_inputs(base_dir: Path, inputs: list[MergeInput], out_dir: Path, adapter_rank: int | None) -> None:
    if adapter_rank is not None and (isinstance(adapter_rank, bool) or int(adapter_rank) < 1):
        raise PaftError(f"adapter_rank must be a positive integer, got {adapter_rank!r}")
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


def _check_config(base_cfg: dict, input_dir: Path, allow_vocab_mismatch: bool) -> None:
    """A full fine-tuned model must have the base's architecture (and vocabulary, unless allowed)."""
    path = input_dir / "config.json"
    if not path.is_file():
        return  # a folder of weights only: the tensor names and shapes are still checked
    cfg = read_json(path)
    for key in ARCH_KEYS:
        if key in base_cfg and key in cfg and cfg[key] != base_cfg[key]:
            raise PaftError(f"{path}: {key} is {cfg[key]!r}, the base's is {base_cfg[key]!r} (another architecture)")
    vb, vi = base_cfg.get("vocab_size"), cfg.get("vocab_size")
    if vb is not None and vi is not None and vb != vi and not allow_vocab_mismatch:
        raise PaftError(
            f"{path}: vocab_size is {vi}, the base's is {vb} (allow_vocab_mismatch merges the rows they share)"
        )


def _check_adapter_base(base_dir: Path, adapter_dir: Path) -> None:
    """An adapter records the base it was trained on (``base_model_name_or_path``): it must be this base.

    The same folder (resolved), a folder with the same config and weight files (same names and sizes), or a
    hub id naming it (the base's recorded ``_name_or_path``, or its folder's name as the id's last part)."""
    recorded = read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not recorded:
        return
    rec = Path(recorded)
    if rec.is_dir():
        if rec.resolve() == base_dir.resolve() or _fingerprint(rec) == _fingerprint(base_dir):
            return
    else:
        name = read_json(base_dir / "config.json").get("_name_or_path")
        if recorded in (name, str(base_dir)) or recorded.rstrip("/").split("/")[-1] == base_dir.resolve().name:
            return
    raise PaftError(
        f"{adapter_dir}: adapter was trained on base {recorded!r}, not {base_dir} "
        "(ignore_adapter_base / --ignore-adapter-base merges it anyway)"
    )


def _fingerprint(model_dir: Path) -> tuple:
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == INDEX_FILE)
    cfg = read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")}
    return cfg, [(p.name, p.stat().st_size) for p in files]


def _open_input(base: ModelWeights, base_dir: Path, path: Path, delta_dtype: str, allow_vocab_mismatch: bool,
                ignore_adapter_base: bool) -> dict[str, DeltaItem]:
    """One input's deltas by base tensor name, checked against the base (nothing read yet)."""
    if not path.is_dir():
        raise PaftError(f"{path}: merge input folder does not exist")
    base_cfg = read_json(base_dir / "config.json")
    if is_adapter(path):
        if not ignore_adapter_base:
            _check_adapter_base(base_dir, path)
        return {it.name: it for it in delta_items(base, path, dtype=delta_dtype)}
    _check_config(base_cfg, path, allow_vocab_mismatch)
    vocab = None
    if allow_vocab_mismatch and (path / "config.json").is_file():
        vocab = (base_cfg.get("vocab_size"), read_json(path / "config.json").get("vocab_size"))
    found = {it.name: it for it in delta_items(base, path, dtype=delta_dtype, vocab_rows=vocab)}
    for name in base.names():
        if name not in found:
            raise PaftError(f"{path}: tensor {name!r} of the base is missing")
    return found


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """Run torch ops single-threaded inside (the merge spreads chunks over its own threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    tie_break: TieBreak = "index",
    delta_dtype: str = "input",
    threads: int | None = None,
    allow_vocab_mismatch: bool = False,
    ignore_adapter_base: bool = False,
    adapter_rank: int | None = None,
    hash_inputs: bool = True,
    recipe: str | None = None,
) -> dict:
    """Merge ``inputs`` into ``base_dir`` with ``method``; write ``out_dir`` atomically; return the summary.

    Options (mergekit's parameters of the same name, see :mod:`paft.merge.methods`): ``normalize``
    and ``rescale`` (None: the method's default), ``rescale_norm`` (``l1``: mergekit's norm-preserving
    rescale; ``density``: DARE's ``1 / density``), ``lambda_``, ``sign`` (majority sign method of ties /
    dare_ties: ``total`` (default) or ``frequency``), ``seed`` (DARE's masks), ``tie_break`` (entries tied
    at a top-k threshold: ``index``, lowest index first, no sort; ``sort``, mergekit's choice by a full
    sort), ``delta_dtype`` (``input``: a full model's delta is formed in the tensors' dtype, e.g. bf16, as
    mergekit does by default; ``float32``: exact float32 difference, mergekit's ``dtype: float32``).
    ``threads``: worker threads (default: the CPUs this process may use). ``allow_vocab_mismatch``: a
    full model (or a delta) with another vocabulary size merges the rows it shares with the base (its extra
    rows are dropped; base rows it lacks get no delta from it). ``ignore_adapter_base``: merge a LoRA
    adapter whose recorded base is not ``base_dir`` (shapes are still checked). ``adapter_rank``: also
    write the merge as a LoRA adapter of that rank (``adapter/``, truncated SVD of each linear layer's
    merged delta: :func:`paft.merge.adapter.extract_lora`; its summary says what it could not carry).

    The folder gets a model card (``README.md``: the recipe, ``recipe`` as YAML or built from these
    arguments, and the sha256 of the base's and the inputs' files, hashed on a thread while the merge runs
    unless ``hash_inputs`` is False) and ``merge_summary.json``.

    Tensors that no input changes are copied unchanged (except ``linear`` without normalize, whose
    weights do not sum to 1: it scales every tensor, as mergekit's ``sum_i w_i m_i``); an input without a
    delta for a tensor that another input changes counts as a zero delta there (as a full model equal to
    the base would). Arithmetic is float32; each merged tensor is stored in the base tensor's dtype, in
    the base's file layout (same shards and index), so weight tying and tensor names stay as the base
    has them.
    """
    started = time.perf_counter()
    opts = resolve(method, normalize=normalize, lambda_=lambda_, rescale=rescale, rescale_norm=rescale_norm,
                   sign=sign, tie_break=tie_break, seed=seed)
    spec = opts.spec
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _check_inputs(base_dir, inputs, out_dir, adapter_rank)
    threads = max(1, threads or len(os.sched_getaffinity(0)))

    base = ModelWeights(base_dir)
    items = [_open_input(base, base_dir, Path(inp.path), delta_dtype, allow_vocab_mismatch, ignore_adapter_base)
             for inp in inputs]

    names = set().union(*items)
    if spec.of_models and not opts.normalize and sum(i.weight for i in inputs) != 1:
        names |= {n for n in base.names() if base.dtype(n).is_floating_point}
    stats = [{"tensors": 0, "params": 0, "nonzero": 0, "kept": 0} for _ in inputs]
    weights, densities = [i.weight for i in inputs], [i.density for i in inputs]

    if recipe is None:  # the card's recipe, from the arguments (a call that did not come from a recipe)
        from paft.merge.recipe import Recipe

        recipe = Recipe.model_validate({
            "method": spec.name, "base": str(base_dir),
            "inputs": [{"path": str(i.path), "weight": i.weight, "density": i.density} for i in inputs],
            "lambda_": lambda_, "normalize": normalize, "rescale": rescale, "rescale_norm": rescale_norm,
            "sign": sign, "tie_break": tie_break, "delta_dtype": delta_dtype, "seed": seed,
            "adapter_rank": adapter_rank, "allow_vocab_mismatch": allow_vocab_mismatch,
            "ignore_adapter_base": ignore_adapter_base,
        }).to_yaml()

    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(threads) as pool, _intra_op_threads(1):
        hashes = hasher.submit(input_hashes, base_dir, [i.path for i in inputs]) if hash_inputs else None

        def run(f, n):
            return list(pool.map(f, range(n))) if n > 1 and threads > 1 else [f(c) for c in range(n)]

        # deltas read more than once (top-k plans, l1 rescaling) are computed once and held for the tensor
        reread = (spec.sparsification == "magnitude" or opts.rescale_norm == "l1") and any(
            i.density < 1 for i in inputs)

        def merged(name: str) -> torch.Tensor:
            b = base.get(name)
            spans = chunks(b.shape)
            row = b.numel() // b.shape[0] if b.dim() > 1 else 1
            deltas: list[torch.Tensor | LazyDelta | None] = []
            for found in items:
                it = found.get(name)
                if it is None:
                    deltas.append(None)
                    continue
                if not reread:  # read once: computed in the merge's chunks, never held whole
                    deltas.append(LazyDelta(lambda s, e, it=it: it.rows(s // row, e // row).reshape(-1),
                                            b.numel(), it.dtype))
                    continue
                d = torch.empty(b.shape, dtype=it.dtype)

                def fill(c, d=d, it=it):
                    r0, r1 = spans[c][0] // row, spans[c][1] // row
                    d[r0:r1] = it.rows(r0, r1)

                run(fill, len(spans))
                deltas.append(d)
            out = torch.empty(b.shape, dtype=b.dtype)
            try:
                return merge_into(out, opts, b, deltas, weights, densities, name=name, run=run, stats=stats)
            except NonFinite as e:  # the base's inf / NaN show in full models' deltas too: blame it first
                culprit = base_dir if not bool(torch.isfinite(b.float()).all()) else (
                    None if e.index is None else inputs[e.index].path)
                if culprit is None:
                    raise PaftError(f"{out_dir}: merged tensor {name!r} overflows (weights or lambda too large?)") \
                        from None
                raise PaftError(f"{culprit}: tensor {name!r} has non-finite values (inf or NaN)") from None

        def written(w: SafetensorsWriter, name: str, t: torch.Tensor) -> None:
            w.write(t)
            base.release(name)  # done with it: its pages can go
            for found in items:
                if name in found:
                    found[name].release()

        with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(1) as writer:
            for fname, file_names in base.layout().items():
                specs = [(n, base.dtype(n), base.shape(n)) for n in file_names]
                with SafetensorsWriter(tmp / fname, specs, {**base.files[fname].metadata, "format": "pt"}) as w:
                    pending: deque = deque()  # writes behind the merge, at most two tensors queued
                    for n in file_names:
                        pending.append(writer.submit(written, w, n, merged(n) if n in names else base.get(n)))
                        while len(pending) > 2 or (pending and pending[0].done()):
                            pending.popleft().result()
                    while pending:
                        pending.popleft().result()
            if (base_dir / INDEX_FILE).is_file():
                shutil.copy2(base_dir / INDEX_FILE, tmp / INDEX_FILE)
            for pattern in COPIED_FILES:
                for f in base_dir.glob(pattern):
                    if f.is_file() and not (tmp / f.name).exists():
                        shutil.copy2(f, tmp / f.name)
            summary = _summary(opts, base_dir, inputs, stats, delta_dtype, len(names), len(base.names()) - len(names))
            summary["threads"] = threads
            if adapter_rank is not None:
                summary["adapter"] = extract_lora(base_dir, tmp, tmp / ADAPTER_DIR, int(adapter_rank))
            (tmp / CARD_FILE).write_text(model_card(summary, recipe, hashes.result() if hashes else {}))
            summary["seconds"] = round(time.perf_counter() - started, 3)
            write_json(tmp / SUMMARY_FILE, summary)
    return summary


def _summary(opts, base_dir: Path, inputs: list[MergeInput], stats: list[dict], delta_dtype: str,
             merged: int, copied: int) -> dict:
    spec = opts.spec
    return {
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
        "lambda": opts.lambda_,
        "normalize": opts.normalize,
        # options of the methods that use them (None where the method has no such step)
        "rescale": opts.rescale_norm is not None if spec.sparsification else None,
        "rescale_norm": opts.rescale_norm,
        "sign": SIGN_NAMES[opts.consensus] if opts.consensus else None,
        "tie_break": opts.tie_break if spec.sparsification == "magnitude" else None,
        "delta_dtype": delta_dtype,
        "seed": opts.seed,
        "mergekit": spec.mergekit,
        "tensors_merged": merged,
        "tensors_copied": copied,
    }
