"""The ``prepare`` stage: every configured source → normalised JSONL files in ``data/processed``.

Files written (all JSONL):

``sft``             {prompt, completion, source}                  SFT training pairs
``preference``      {prompt, chosen, rejected, source}            preference training pairs
``rec``             REC examples (see paft/data/world.py)         REC training examples
``eval_tasks``      {prompt, answer, family, context}             held-out tasks (exact match)
``eval_sft``        like ``sft``                                  held-out real SFT pairs
``eval_preference`` like ``preference``                           held-out pairs
``eval_rec``        like ``rec``                                  held-out REC examples (synthetic)
``eval_rec_<name>`` like ``rec``                                  held-out REC examples of each real source
``val_tasks``, ``val_sft``, ``val_preference``                     a validation set like the eval_* ones, apart
                                                                  from them: what the merge search selects on
``corpus``          {text}                                        language-model text for the tiny base

plus ``summary.json`` (row counts per file and per source, counted drops). The data version is the
content hash of the folder; the folder is written whole or not at all.
"""

from __future__ import annotations

import random
from pathlib import Path

from paft.config import HubSource, LocalSource, Params, SyntheticSource
from paft.data import world
from paft.io import atomic_dir, hash_dir, write_json, write_jsonl

SPLITS = ("sft", "preference", "rec", "eval_tasks", "eval_sft", "eval_preference", "eval_rec", "val_tasks", "val_sft",
          "val_preference", "corpus")


def _load_source(params: Params, src):
    from paft.data import sources  # imported lazily: datasets is slow to import

    if isinstance(src, LocalSource):
        return sources.load_local(params.path(src.path), src.format, limit=src.limit)
    return sources.load_hub(src.name, format=src.format, split=src.split, config=src.config, limit=src.limit)


def collect(params: Params) -> tuple[dict[str, list[dict]], dict]:
    """Load every source into the split lists; returns (splits, per-source report)."""
    cfg = params.data
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    report: dict[str, dict] = {}
    for i, src in enumerate(cfg.sources):
        if isinstance(src, SyntheticSource):
            parts = world.generate(cfg.seed, src.n_sft, src.n_preference, src.n_rec, src.n_eval, list(params.rec.dimensions))
            for name, rows in parts.items():
                splits[name].extend(rows)
            report[f"{i}:synthetic"] = {name: len(rows) for name, rows in parts.items()}
            continue
        assert isinstance(src, LocalSource | HubSource)
        loaded = _load_source(params, src)
        rows = list(loaded.rows)
        random.Random(f"{cfg.seed}-split-{i}").shuffle(rows)
        n_eval = int(round(len(rows) * cfg.eval_fraction)) if len(rows) > 2 else 0
        held, val, train = rows[:n_eval], rows[n_eval : 2 * n_eval], rows[2 * n_eval :]
        splits[loaded.role].extend(train)
        splits[f"eval_{loaded.role}"].extend(held)
        splits[f"val_{loaded.role}"].extend(val)
        for r in train:  # real text also teaches the tiny base model its language
            texts = [r["prompt"], r.get("completion") or r.get("chosen", "")]
            splits["corpus"].append({"text": "\n".join(t for t in texts if t)})
        name = src.path if isinstance(src, LocalSource) else src.name
        report[f"{i}:{name}"] = {"role": loaded.role, "train": len(train), "eval": len(held), "val": len(val),
                                 "dropped": dict(loaded.dropped)}
    _rec_sources(params, splits, report)
    return splits, report


def _rec_sources(params: Params, splits: dict[str, list[dict]], report: dict) -> None:
    """Real REC data (``rec.sources``): a held-out part per source (``eval_rec_<builder>``); the rest mixed by weight
    with the synthetic REC examples."""
    from paft.rec.data import load, mix, split_holdout

    parts = [(splits["rec"], 1.0)]
    for src in params.rec.sources:
        rows = load(src.builder, str(params.path(src.path)) if src.path else None, hub=src.hub, split=src.split,
                    config=src.config, limit=src.limit)
        train, held = split_holdout(rows, params.data.eval_fraction, params.data.seed)
        parts.append((train, src.weight))
        key = f"eval_rec_{src.builder}"
        splits[key] = splits.get(key, []) + held
        report[f"rec:{src.builder}:{src.path or src.hub}"] = {"train": len(train), "eval": len(held), "weight": src.weight}
    if len(parts) > 1:
        splits["rec"] = mix(parts, params.data.seed)


def prepare(params: Params, out_dir: str | Path | None = None) -> dict:
    """Run the stage; returns ``{"path", "data_version", "counts"}``. Nothing is written on error."""
    out = Path(out_dir) if out_dir is not None else params.path(params.paths.data_dir)
    splits, report = collect(params)
    counts = {name: len(rows) for name, rows in splits.items()}
    with atomic_dir(out, keep="same") as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        write_json(tmp / "summary.json", {"counts": counts, "sources": report, "seed": params.data.seed})
    return {"path": str(out), "data_version": hash_dir(out), "counts": counts}
