"""Caching of the training tasks: a rerun of the flow (after the merge failed, say) reuses the jobs that finished.

The key is what decides a job's output: the task, its stage config, seed, dtype and GPUs per job, the identity of
its inputs (base model, data version, upstream outputs) and the code of ``paft/`` and ``tasks/``. It leaves out
what differs between flow runs without changing the output: the run folder and the MLflow parent run.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from paft.config import Params
from paft.io import hash_dir, hash_obj

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = ("run_dir", "parent_id")  # inputs that name this flow run, not what the job computes
IDENTITY = ("path", "data_version", "run_id")  # what identifies a stage result passed on as input


@functools.cache
def code_version() -> str:
    """Hash of the Python sources of ``paft/`` and ``tasks/`` (the code a training job and its task run)."""
    h = hashlib.sha256()
    for f in sorted(p for d in ("paft", "tasks") for p in (ROOT / d).rglob("*.py")):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_config(params: Params, task_name: str, job: str | None = None) -> dict:
    """The config that shapes the task's job: REC's, or training job ``job``'s (default: the task's kind; the
    sequential baseline trains with train.align)."""
    if task_name == "train_rec":
        return params.rec.model_dump()
    return params.train.job(job or ("align" if task_name == "train_sequential" else task_name[len("train_"):]))[1].model_dump()


def _identity(value: Any, run_dir: str | None) -> Any:
    """A stage result → its path, data version and MLflow run; a folder this flow run wrote → its content."""
    if isinstance(value, dict):
        return {k: _identity(value[k], run_dir) for k in IDENTITY if k in value}
    if isinstance(value, str) and run_dir and Path(value).is_dir() and Path(value).resolve().is_relative_to(Path(run_dir).resolve()):
        return {"content": hash_dir(value)}  # e.g. the merged model REC starts from: new path each run, same bytes
    return value


@dataclass
class TrainingCache(CachePolicy):
    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        params: Params = inputs["params"]
        if not params.orchestration.cache:
            return None
        name = task_ctx.task.name
        run_dir = inputs.get("run_dir")
        return hash_obj({
            "task": name,
            "config": stage_config(params, name, inputs.get("job")),
            "seed": params.seed,
            "model": {"dtype": params.model.dtype, "trust_remote_code": params.model.trust_remote_code},
            "gpus_per_job": params.resources.gpus_per_job,
            "inputs": {k: _identity(v, run_dir) for k, v in sorted(inputs.items()) if k != "params" and k not in PER_RUN},
            "code": code_version(),
        })
