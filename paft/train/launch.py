"""Launch one training job as a subprocess and wait for it (the flow runs two of these at once)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from paft.config import Params
from paft.errors import JobKilled, PaftError, StageError
from paft.io import read_json
from paft.train.common import Job, MlflowRun


def default_threads() -> int:
    """Torch threads per job: the cores split between the two jobs that run side by side."""
    return max(1, (os.cpu_count() or 2) // 2)


class DeviceLeases:
    """Disjoint GPU sets and distinct ``MASTER_PORT``s for the jobs this process runs at once (thread-safe).

    A job asking for ``gpus`` devices waits until that many are free; its subprocesses see only those
    (``CUDA_VISIBLE_DEVICES``) and rendezvous on their own port, so the SFT and alignment jobs of the PAFT
    fan-out never share a GPU or a port. ``gpus`` 0 (CPU jobs) leaves the devices alone and only gets a port.
    """

    def __init__(self, devices: list[str]):
        self.devices = list(devices)
        self._free = list(devices)
        self._ports: set[int] = set()
        self._cond = threading.Condition()

    @classmethod
    def from_env(cls) -> "DeviceLeases":
        """The devices this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every CUDA device."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return cls([d.strip() for d in visible.split(",") if d.strip()])
        import torch

        return cls([str(i) for i in range(torch.cuda.device_count())])

    def _port(self) -> int:
        while True:
            with socket.socket() as s:  # a port the OS reports free, never one handed to a running job
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in self._ports:
                self._ports.add(port)
                return port

    @contextmanager
    def lease(self, gpus: int) -> Iterator[dict[str, str]]:
        """The environment for one job (``CUDA_VISIBLE_DEVICES`` when ``gpus`` > 0, ``MASTER_PORT``)."""
        if gpus > len(self.devices):
            raise PaftError(f"resources.gpus_per_job is {gpus}, but this machine has {len(self.devices)} GPU(s) "
                            f"({'CUDA_VISIBLE_DEVICES=' + ','.join(self.devices) if self.devices else 'none visible'})")
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) >= gpus)
            mine, self._free = self._free[:gpus], self._free[gpus:]
            port = self._port()
        env = {"MASTER_PORT": str(port)} | ({"CUDA_VISIBLE_DEVICES": ",".join(mine)} if gpus else {})
        try:
            yield env
        finally:
            with self._cond:
                self._free += mine
                self._ports.discard(port)
                self._cond.notify_all()


_LEASES: DeviceLeases | None = None
_LEASES_LOCK = threading.Lock()


def leases() -> DeviceLeases:
    """The process-wide leases (made on first use)."""
    global _LEASES
    with _LEASES_LOCK:
        if _LEASES is None:
            _LEASES = DeviceLeases.from_env()
        return _LEASES


def training_job(name: str, params: Params, base: str, data: str | Path, out: str | Path) -> Job:
    """The job ``name`` from the params: "rec", or a training job of the fan-out ("sft", "align" or a variant
    of ``train.variants``)."""
    kind, section = ("rec", params.rec) if name == "rec" else params.train.job(name)
    cfg = section.model_dump()
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
           accelerate_config: str | None = None, devices: DeviceLeases | None = None,
           mlflow_run: MlflowRun | dict | None = None) -> dict:
    """Run ``job`` in its own process(es) on ``gpus`` GPUs of its own (see DeviceLeases); returns its summary.
    The log is kept beside the output.

    With ``mlflow_run`` (``Tracker.for_job(run_id)``) the trainer reports to that MLflow run: the curves at their
    steps and the system metrics (see MlflowRun). Without it, nothing is logged to MLflow."""
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job_file = out.parent / f"{out.name}.job.json"
    log_file = out.parent / f"{out.name}.log"
    if job.threads is None:
        job.threads = default_threads()
    if mlflow_run is not None:
        job.mlflow = asdict(mlflow_run if isinstance(mlflow_run, MlflowRun) else MlflowRun(**mlflow_run))
    job.save(job_file)
    tracking = job.mlflow_run.env() if job.mlflow else {}
    with (devices or leases()).lease(gpus) as lease, log_file.open("w") as log:
        run_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(job.threads), **lease,
                   **tracking, **(env or {})}
        proc = subprocess.run(
            command(job_file, python, gpus, accelerate_config),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env,
        )
    if proc.returncode < 0 or proc.returncode in (128 + 9, 128 + 15):  # a signal, directly or through a launcher
        sig = -proc.returncode if proc.returncode < 0 else proc.returncode - 128
        raise JobKilled(f"{job.kind} training was killed by signal {sig} (log {log_file}); "
                        "running it again resumes from its last checkpoint")
    if proc.returncode != 0:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else "no output"
        raise StageError(f"{job.kind} training failed (exit {proc.returncode}; log {log_file}): {last}")
    return read_json(out / "summary.json")
