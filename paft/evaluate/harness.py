"""Standard benchmarks on a candidate model through lm-evaluation-harness (``evaluate.harness_tasks``).

A task is named as lm-eval names it, optionally with its own few-shot count: ``arc_challenge:25``,
``hellaswag:10``, ``truthfulqa_mc2`` (the task's default). Tasks come from lm-eval's built-in set and from
include paths (folders of task YAMLs); :func:`jsonl_task` writes such a folder for a small local task given
as a JSONL file, so a task can be defined without writing YAML (and the tests run offline).

Metric names: lm-eval reports ``"<metric>,<filter>"`` per task (``"acc,none"``, ``"exact_match,strict-match"``);
they become ``harness_<task>_<metric>`` when the filter is ``none`` and ``harness_<task>_<metric>_<filter>``
otherwise (``harness_arc_challenge_acc``, ``harness_gsm8k_exact_match_strict-match``). Standard errors and
non-numeric entries are left out; any character MLflow does not allow in a metric name becomes ``_``. Only the
requested tasks and groups are reported (``mmlu``, not its 57 subtasks); the raw results hold everything.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from paft.errors import ConfigError, DataError
from paft.io import iter_jsonl, write_json

log = logging.getLogger(__name__)

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_NOT_METRIC_CHAR = re.compile(r"[^A-Za-z0-9_\-. /]")
# one seed for python, numpy, torch and the few-shot sampler (lm-eval's defaults: 0 for python's, 1234 for the rest)
SEED = 1234
# the parts of lm-eval's results kept in harness.json, merged over the calls (one per few-shot count)
_RAW_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
# the loggers that talk during an evaluation; quieter for its duration
_CHATTY = ("lm_eval", "datasets", "transformers.generation")


def parse_task_spec(spec: str) -> tuple[str, int | None]:
    """``"arc_challenge:25"`` -> ``("arc_challenge", 25)``; ``"hellaswag"`` -> ``("hellaswag", None)`` (the
    task's own few-shot count)."""
    name, sep, shots = spec.strip().partition(":")
    if not _TASK_NAME.fullmatch(name):
        raise ConfigError(
            f"harness task {spec!r}: expected a task name, optionally with ':<few-shot count>' (e.g. 'arc_challenge:25')"
        )
    if not sep:
        return name, None
    if not shots.isdigit():
        raise ConfigError(
            f"harness task {spec!r}: the few-shot count after ':' must be a whole number >= 0 (e.g. 'arc_challenge:25')"
        )
    return name, int(shots)


def metric_name(task: str, key: str) -> str | None:
    """The flat metric name of lm-eval's result ``key`` (``"acc,none"``) for ``task``; None for a standard error
    or a key that names no metric (``"alias"``)."""
    metric, sep, filt = key.partition(",")
    if not sep or metric.endswith("_stderr"):
        return None
    name = f"harness_{task}_{metric}" + ("" if filt == "none" else f"_{filt}")
    return _NOT_METRIC_CHAR.sub("_", name)


def flat_metrics(results: dict[str, Any], names: Sequence[str] | None = None) -> dict[str, float]:
    """Flat metrics of lm-eval's results: of the requested ``names`` that were reported (a task or a group); a
    requested tag (reported as its tasks) or ``names=None``: of every entry that belongs to no reported group."""
    per_task: dict[str, dict] = results.get("results", {})
    children = {c for subs in results.get("group_subtasks", {}).values() for c in subs}
    top = [t for t in per_task if t not in children]
    wanted = top if names is None else [n for n in names if n in per_task]
    if names is not None and any(n not in per_task for n in names):  # a tag: its tasks are reported, not it
        wanted += [t for t in top if t not in wanted and t not in names]
    out: dict[str, float] = {}
    for task in wanted:
        for key, value in per_task[task].items():
            name = metric_name(task, key)
            if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[name] = float(value)
    return out


def check_jsonl_task(jsonl: str | Path, kind: str | None = None, name: str | None = None) -> str:
    """Check a local task's JSONL file (see :func:`jsonl_task`) and return its kind: ``kind``, or when None,
    ``multiple_choice`` if the first row has ``choices``, else ``generate_until``. A malformed line, a missing or
    wrong field raises DataError naming file and line."""
    name = name or Path(jsonl).stem
    if not _TASK_NAME.fullmatch(name):
        raise ConfigError(f"harness task name {name!r}: use letters, digits, '_', '-', '.' (no ':' or '/')")
    if kind not in (None, "multiple_choice", "generate_until"):
        raise ConfigError(f"harness task {name}: kind must be 'multiple_choice' or 'generate_until', got {kind!r}")
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise DataError(f"{jsonl}: no such file (harness task {name})")
    n = 0
    with jsonl.open(encoding="utf-8") as f:
        for lineno, row in iter_jsonl(f, jsonl):
            if kind is None and isinstance(row, dict):
                kind = "multiple_choice" if "choices" in row else "generate_until"
            _check_row(row, kind, f"{jsonl}:{lineno}")
            n += 1
    if n == 0:
        raise DataError(f"{jsonl}: no rows (harness task {name})")
    return kind


def jsonl_task(
    name: str,
    jsonl: str | Path,
    out_dir: Path,
    *,
    kind: Literal["multiple_choice", "generate_until"] | None = "multiple_choice",
    max_new_tokens: int = 32,
) -> Path:
    """An lm-eval task ``name`` for a local JSONL file, written into ``out_dir``; returns ``out_dir`` (pass it in
    ``include_paths``).

    Rows: ``{"question", "choices": [str, ...], "answer": <index of the right choice>}`` for a multiple-choice
    task (scored by ``acc``: the right choice, after a space, has the highest log-likelihood following
    ``"Question: <question>\\nAnswer:"``; ``acc_norm``: the same per character of the choice), ``{"question",
    "answer": str}`` for a generation task (greedy, up to ``max_new_tokens`` or a newline; scored by
    ``exact_match``, surrounding whitespace ignored); ``kind`` None: told by the first row. The file is
    checked first (a malformed line or a missing field raises DataError naming file and line) and copied beside
    the task YAML, so the folder is the task. Few-shot examples are drawn from the same rows, never the one asked.
    """
    kind = check_jsonl_task(jsonl, kind, name)
    jsonl = Path(jsonl)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    if data.resolve() != jsonl.resolve():
        shutil.copyfile(jsonl, data)
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        # datasets' Arrow copy of the rows stays in the task folder, not in ~/.cache
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / ".cache" / name)},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": kind,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
    }
    if kind == "multiple_choice":
        config["doc_to_choice"] = "{{choices}}"
        config["metric_list"] = [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ]
    else:
        config["generation_kwargs"] = {"until": ["\n"], "max_gen_toks": max_new_tokens, "do_sample": False}
        config["metric_list"] = [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
             "regexes_to_ignore": [r"^\s+", r"\s+$"]},
        ]
    config["metadata"] = {"version": 1.0, "source": str(jsonl.resolve())}
    (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out_dir


def _check_row(row: dict, kind: str, where: str) -> None:
    def field(key: str, types: type | tuple[type, ...], what: str):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} ({what})")
        v = row[key]
        if not isinstance(v, types) or isinstance(v, bool):
            raise DataError(f"{where}: field {key!r} must be {what}, got {type(v).__name__}")
        return v

    field("question", str, "a string")
    if kind == "generate_until":
        field("answer", str, "the expected answer, a string")
        return
    choices = field("choices", list, "a list of at least 2 strings")
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of at least 2 strings")
    answer = field("answer", int, "the index of the right choice")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: field 'answer' is {answer}, not an index of the {len(choices)} choices")


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_paths: Sequence[str | Path] = (),
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    out_dir: Path | None = None,
    seed: int = SEED,
) -> dict[str, float]:
    """Run lm-eval ``tasks`` (specs as :func:`parse_task_spec` reads them) on a loaded transformers model and
    return flat metrics (see the module's docstring for the names).

    Tasks without a few-shot count run with their own default, the others in one lm-eval call per count.
    ``include_paths``: folders of extra task YAMLs (they take precedence over built-in tasks of the same name).
    ``limit``: at most this many examples per task (smoke tests). ``max_length``: the model's context in tokens
    (default: from its config). ``out_dir``: where ``harness.json`` (the raw per-task results) is written.
    Seeded (python, numpy, torch, few-shot sampling) with ``seed``. An unknown task raises ConfigError.
    """
    if not tasks:
        return {}
    specs = [parse_task_spec(t) for t in tasks]
    names = [n for n, _ in specs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"harness tasks: {', '.join(dupes)} listed more than once")
    include = [str(Path(p).resolve()) for p in include_paths]
    for p in include:
        if not Path(p).is_dir():
            raise ConfigError(f"harness include path {p}: no such folder")

    by_shots: dict[int | None, list[str]] = {}
    for name, shots in specs:
        by_shots.setdefault(shots, []).append(name)

    raw: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    with _quiet():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        manager = _task_manager(names, include)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        for shots, group in by_shots.items():
            log.info("lm-eval: %s (%s-shot)", ", ".join(group), "default" if shots is None else shots)
            res = simple_evaluate(
                model=lm,
                tasks=group,
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,  # closed-form stderr for means; in-process bootstrap (see _quiet) for the rest
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            metrics |= flat_metrics(res, group)
            for key in _RAW_KEYS:
                if isinstance(res.get(key), dict):
                    raw.setdefault(key, {}).update(res[key])
            raw.setdefault("config", {k: v for k, v in res.get("config", {}).items() if k != "model_args"})
            raw.setdefault("lm_eval_version", res.get("lm_eval_version"))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        head = {"tasks": tasks, "include_paths": include, "limit": limit, "seed": seed}
        write_json(Path(out_dir) / "harness.json", head | raw)
    log.info("lm-eval: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if not math.isnan(v)))
    return metrics


def _task_manager(names: list[str], include: list[str]):
    """lm-eval's TaskManager that knows ``names``; built from the include paths alone when they define every
    name (a task, or a group of such tasks): indexing lm-eval's ~15k built-in tasks takes seconds. Unknown name:
    ConfigError."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    def local_only(name: str, index: dict, depth: int = 0) -> bool:
        e = index.get(name)
        if e is None or depth > 8:
            return False
        if e.kind == Kind.GROUP:  # inline task configs (dicts) need nothing else
            children = (e.cfg or {}).get("task") or []
            return all(isinstance(c, dict) or local_only(c, index, depth + 1) for c in children)
        return e.kind == Kind.TASK

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(local_only(n, local.task_index) for n in names):
            return local
    manager = TaskManager(include_path=include or None)
    for n in names:
        if n not in manager.task_index:
            near = difflib.get_close_matches(n, manager.all_tasks, n=3)
            where = "lm-eval's built-in tasks" + (
                f" and the include paths {', '.join(include)} (a YAML there that does not parse is skipped)"
                if include else " (no include paths)"
            )
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"harness task {n!r} not found in {where}{hint}")
    return manager


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """For the duration of an evaluation: lm-eval, datasets and generation loggers at ERROR, no datasets progress
    bars, no download-count ping, bootstrap stderr in-process (lm-eval would start a process pool per metric).
    All restored afterwards, the environment in full (importing lm-eval and scikit-learn sets a few variables)."""
    import datasets

    levels = {n: logging.getLogger(n).level for n in _CHATTY}
    for n in _CHATTY:
        logging.getLogger(n).setLevel(logging.ERROR)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # datasets pings S3 to count the use of a packaged builder ("json") on every load: the only network access
    # of a local task. Its setting is read at import, so the switch is flipped on the module itself.
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    env = dict(os.environ)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
