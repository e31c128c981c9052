"""Evaluate every candidate model (base, SFT, alignment, PAFT merges) and the REC evaluator."""

from __future__ import annotations

import time
from pathlib import Path

from paft.config import Params
from paft.data.formats import format_prompt
from paft.errors import ConfigError
from paft.evaluate import metrics as M
from paft.io import atomic_dir, read_jsonl, write_json, write_jsonl


def merge_name(method: str, sft_job: str, align_job: str) -> str:
    """The candidate name of a PAFT merge: ``paft_<method>``, plus the SFT job's name (without its ``sft_``) and the
    alignment job's when they are not train.sft / train.align: ``paft_ties_l1``, ``paft_ties_l1_orpo``."""
    parts = [f"paft_{method}"]
    if sft_job != "sft":
        parts.append(sft_job.removeprefix("sft_"))
    if align_job != "align":
        parts.append(align_job)
    return "_".join(parts)


def merge_plan(params: Params) -> dict[str, tuple[str, str, str]]:
    """The PAFT merges of the flow: candidate name -> (method, SFT job, alignment job); every method of
    ``merge.methods`` over every pair of ``merge.sft`` × ``merge.align``. The first is "the" PAFT model."""
    m = params.merge
    return {merge_name(method, s, a): (method, s, a) for s in m.sft for a in m.align for method in m.methods}


def selected(params: Params, candidates: list[dict]) -> list[dict]:
    """The candidates ``evaluate.candidates`` names (names or shell patterns; null: all), in their order."""
    from fnmatch import fnmatchcase

    patterns = params.evaluate.candidates
    return [c for c in candidates if patterns is None or any(fnmatchcase(c["name"], p) for p in patterns)]


def candidate(name: str, base: str, trained: str) -> dict:
    """A candidate from a training output: a LoRA adapter on ``base``, or a full model folder."""
    from paft.train.export import is_adapter

    return {"name": name, "path": base, "adapter": trained} if is_adapter(trained) else {"name": name, "path": trained}


def load_candidate(params: Params, candidate: dict):
    """(tokenizer, model) of a candidate: a model folder / id, optionally with a LoRA adapter folded in."""
    from paft.models import load_model
    from paft.train.export import merged_model

    import torch

    m = params.model
    if candidate.get("adapter"):
        tok, model = merged_model(candidate["path"], candidate["adapter"], m.dtype, m.trust_remote_code)
    else:
        tok, model = load_model(candidate["path"], m.dtype, m.trust_remote_code)
    return tok, model.to("cuda") if torch.cuda.is_available() else model


def _held_out(data_dir: Path, name: str, limit: int) -> list[dict]:
    """The first ``limit`` rows of a held-out file (of each REC task, for REC examples)."""
    from paft.rec.evaluate import limit_per_task

    path = data_dir / f"{name}.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return limit_per_task(rows, limit) if name.startswith("eval_rec") else rows[:limit]


def harness_includes(params: Params, out_dir: Path | None = None) -> list[Path]:
    """The include paths of ``evaluate.harness_include``: folders of task YAMLs as given, and each JSONL file a local
    task named after the file (:func:`paft.evaluate.harness.jsonl_task`), written under ``out_dir``; with ``out_dir``
    None the files are only checked (a bad line stops the flow before any work, naming file and line)."""
    from paft.evaluate.harness import check_jsonl_task, jsonl_task

    out: list[Path] = []
    for entry in params.evaluate.harness_include:
        path = params.path(entry)
        if path.suffix != ".jsonl":
            if not path.is_dir():
                raise ConfigError(f"evaluate.harness_include: {path} is neither a folder of task YAMLs nor a .jsonl file")
            out.append(path)
        elif out_dir is None:
            check_jsonl_task(path)
        else:
            out.append(jsonl_task(path.stem, path, out_dir / path.stem, kind=None))
    return out


def reference_logprobs(params: Params, reference: str, data_dir: str | Path, split: str = "eval") -> tuple | None:
    """``pair_logprobs`` of the ``reference`` model (the base) on the split's held-out pairs: what DPO's implicit
    reward of every candidate is measured against (``evaluate_all(reference=...)``); None without pairs."""
    pairs = _held_out(Path(data_dir), f"{split}_preference", params.evaluate.max_examples)
    if not pairs:
        return None
    tok, model = load_candidate(params, {"path": reference})
    return M.pair_logprobs(model, tok, pairs, params.evaluate.batch_size)


def evaluate_all(params: Params, candidates: list[dict], rec_path: str | None, data_dir: str | Path, out_dir: str | Path,
                 reference: tuple | None = None, harness: bool = True, split: str = "eval") -> dict:
    """Metrics per candidate (plus ``rec`` for the evaluator itself); generations and results saved in ``out_dir``.

    ``reference``: :func:`reference_logprobs` of the same split, for the implicit reward of every candidate.
    ``harness``: also run ``evaluate.harness_tasks`` (lm-evaluation-harness) on each candidate. ``split``: ``eval``
    (the held-out sets the results report, and REC's own quality) or ``val`` (the validation sets the merge search
    selects on, so that its choice is not made on the sets it is reported on)."""
    from paft.data.world import format_answer

    cfg, rec = params.evaluate, params.rec
    data_dir = Path(data_dir)
    tasks = _held_out(data_dir, f"{split}_tasks", cfg.max_examples)
    pairs = _held_out(data_dir, f"{split}_preference", cfg.max_examples)
    sft_rows = _held_out(data_dir, f"{split}_sft", cfg.max_examples)  # real SFT data held out by prepare
    task_rows = [{"prompt": t["prompt"], "completion": format_answer(t["answer"])} for t in tasks]
    rec_sets = {"rec" if f.stem == "eval_rec" else f"rec_{f.stem[len('eval_rec_'):]}": _held_out(data_dir, f.stem, cfg.max_examples)
                for f in sorted(data_dir.glob("eval_rec*.jsonl"))} if split == "eval" else {}
    judge = None
    if rec_path:
        from paft.rec.judge import Judge, JudgeOptions

        rec_tok, rec_model = load_candidate(params, {"path": rec_path})
        judge = Judge(rec_model, rec_tok, JudgeOptions.from_params(params))
    results: dict[str, dict] = {}
    with atomic_dir(out_dir) as tmp:
        harness_tasks = cfg.harness_tasks if harness else []
        includes = harness_includes(params, tmp / "harness_tasks") if harness_tasks else []
        for cand in candidates:
            started = time.time()
            tok, model = load_candidate(params, cand)
            row: dict[str, float] = {}
            gens: list[str] = []
            if tasks:
                gens = M.generate(model, tok, [format_prompt(t["prompt"], tok) for t in tasks], cfg.max_new_tokens, cfg.batch_size)
                row.update(M.task_metrics(gens, tasks))
                row["task_loss"] = M.completion_loss(model, tok, task_rows, cfg.batch_size)
            if sft_rows:
                row["sft_loss"] = M.completion_loss(model, tok, sft_rows, cfg.batch_size)
            row.update(M.preference_accuracy(model, tok, pairs, cfg.batch_size, reference=reference))
            if judge and tasks:
                row.update(M.rec_ratings(judge, tasks, gens, cfg.rec_dimensions, rec.citations))
            if harness_tasks:
                from paft.evaluate.harness import run_harness

                row.update(run_harness(model, tok, harness_tasks, include_paths=includes, limit=cfg.harness_limit,
                                       batch_size=cfg.batch_size, out_dir=tmp / f"harness_{cand['name']}",
                                       seed=params.seed))
            row["eval_seconds"] = round(time.time() - started, 2)
            results[cand["name"]] = row
            write_jsonl(tmp / f"generations_{cand['name']}.jsonl",
                        [{**t, "generation": g} for t, g in zip(tasks, gens)])
            del model
        if judge:
            from paft.rec.evaluate import evaluate_judge

            for name, rows in rec_sets.items():
                if rows:
                    metrics, per_example = evaluate_judge(judge, rows, rec.citations)
                    results[name] = {f"rec_{k}": v for k, v in metrics.items()}
                    write_jsonl(tmp / f"judgments_{name}.jsonl", per_example)
        write_json(tmp / "results.json", results)
    return results
