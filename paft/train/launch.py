"""Launch one training job as a subprocess and wait for it (the flow runs two of these at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from paft.config import Params
from paft.errors import StageError
from paft.io import read_json
from paft.train.common import Job


def default_threads() -> int:
    """Torch threads per job: the cores split between the two jobs that run side by side."""
    return max(1, (os.cpu_count() or 2) // 2)


def training_job(kind: str, params: Params, base: str, data: str | Path, out: str | Path) -> Job:
    """The job for stage ``kind`` ("sft", "align" or "rec") from the params."""
    cfg = {"sft": params.train.sft, "align": params.train.align, "rec": params.rec}[kind].model_dump()
    if cfg["deepspeed"]:  # like every path in a params file, relative to that file's folder
        cfg["deepspeed"] = str(params.path(cfg["deepspeed"]).resolve())
    return Job(
        kind=kind,
        base=str(base),
        data=str(data),
        out=str(out),
        cfg=cfg,
        seed=params.seed,
        threads=params.resources.cpu_threads,
        dtype=params.model.dtype,
        trust_remote_code=params.model.trust_remote_code,
    )


def command(job_file: str | Path, python: str | None = None, gpus: int = 0, accelerate_config: str | None = None) -> list[str]:
    """The job's command line: one process, or ``accelerate launch`` with one process per GPU when ``gpus`` > 1."""
    python = python or sys.executable
    if gpus > 1:
        cfg = ["--config_file", str(accelerate_config)] if accelerate_config else ["--multi_gpu"]
        return [python, "-m", "accelerate.commands.launch", *cfg, "--num_processes", str(gpus),
                "-m", "paft.train", str(job_file)]
    return [python, "-m", "paft.train", str(job_file)]


def launch(job: Job, python: str | None = None, env: dict | None = None, gpus: int = 0,
           accelerate_config: str | None = None) -> dict:
    """Run ``job`` in its own process(es); returns its summary. The log is kept beside the output."""
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job_file = out.parent / f"{out.name}.job.json"
    log_file = out.parent / f"{out.name}.log"
    if job.threads is None:
        job.threads = default_threads()
    job.save(job_file)
    run_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(job.threads), **(env or {})}
    with log_file.open("w") as log:
        proc = subprocess.run(
            command(job_file, python, gpus, accelerate_config),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env,
        )
    if proc.returncode != 0:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        raise StageError(f"{job.kind} training failed (exit {proc.returncode}; log {log_file}): {last}")
    return read_json(out / "summary.json")
