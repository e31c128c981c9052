"""MLflow: the only module that imports it. Parent run per flow run, child run per stage, registry.

Everything goes through an explicit ``MlflowClient`` on an explicit tracking URI (no fluent
active-run state), so that stages running in threads side by side never log into each other's run.
The one exception is ``job_run``, inside a training subprocess: there the trainer's MLflowCallback
logs through the fluent API into the run it is given, and that process runs one job only.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from paft.config import Params
from paft.errors import PaftError
from paft.train.common import MlflowRun

PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading artifacts back: no progress bars


def git_commit(cwd: str | Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Stop early, with one clear line, when an MLflow tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except OSError as e:
        problem = str(getattr(e, "reason", e))
    raise PaftError(f"tracking.uri: MLflow tracking server {uri} is unreachable ({problem}); start it or change tracking.uri")


def metric_name(key: str) -> str:
    """A trainer log key as transformers' MLflowCallback names the metric (characters MLflow refuses become _)."""
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)


@contextlib.contextmanager
def job_run(run: MlflowRun) -> Iterator[None]:
    """In a training subprocess (its main process): ``run`` is the active MLflow run while the job runs, so the
    trainer's MLflowCallback (``report_to=["mlflow"]``) logs its params and curves into it instead of starting
    and ending a run of its own, and system metrics are sampled from start to end.

    The run ends FINISHED (FAILED if the job raised); the parent sets the stage's final status afterwards.
    A job killed by a signal leaves it RUNNING; rerunning the job resumes it (system metrics continue at the
    next step)."""
    for k, v in run.env().items():  # MLflow reads the sampling interval from the environment
        os.environ.setdefault(k, v)
    # the callback starts a run of its own when MLFLOW_RUN_ID is set, which fails with one already active
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(run.tracking_uri)
    mlflow.start_run(run_id=run.run_id, log_system_metrics=True)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            mlflow.flush_async_logging()  # the callback logs asynchronously
        mlflow.end_run(status)  # stops the system metrics monitor and logs its last samples


@contextlib.contextmanager
def _one_process_at_a_time(uri: str) -> Iterator[None]:
    """For a sqlite store: two processes opening a new one at once race on its schema migrations (alembic:
    "expected to match one row") and on creating the experiment; a file lock beside the database orders them."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_location: str | Path | None = None):
        check_reachable(uri)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        with _one_process_at_a_time(uri):
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                # a tracking server stores artifacts where it is configured to (e.g. S3); a local store in the folder given
                remote = uri.startswith(("http://", "https://"))
                location = Path(artifact_location).resolve().as_uri() if artifact_location and not remote else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id

    @classmethod
    def from_params(cls, params: Params) -> "Tracker":
        t = params.tracking
        return cls(params.tracking_uri, t.experiment, params.path(t.artifact_location))

    # ------------------------------------------------------------------ runs
    def start(self, name: str, parent_id: str | None = None, tags: dict | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def for_job(self, run_id: str, system_metrics_interval: float | None = None) -> MlflowRun:
        """Run ``run_id`` as a training job's MLflow run (``launch(job, mlflow_run=...)``): the trainer logs its
        curves into it and system metrics are sampled every ``system_metrics_interval`` seconds (default: the
        environment's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else 2)."""
        if system_metrics_interval is None:
            system_metrics_interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 2.0)
        return MlflowRun(self.uri, run_id, self.experiment_id, system_metrics_interval)

    def end(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        items = [
            Metric(k, float(v), 0, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_history(self, run_id: str, history: list[dict], prefix: str = "", until_step: int | None = None) -> None:
        """A trainer's ``log_history`` as step-indexed metrics (the curves), named as the trainer's MLflowCallback
        names them (``loss``, ``rewards/chosen``, ...); only the entries up to ``until_step`` when given (e.g. the
        part before a resumed checkpoint, which the callback of the resumed job did not log)."""
        items = []
        for h in history:
            step = int(h.get("step", 0))
            if until_step is not None and step > until_step:
                continue
            for k, v in h.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    items.append(Metric(prefix + metric_name(k), float(v), 0, step))
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local: str | Path, artifact_path: str | None = None) -> None:
        local = Path(local)
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_dict(self, run_id: str, obj: dict, name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    # ------------------------------------------------------------------ reading runs back
    def run(self, run_id: str) -> dict:
        """A run's name, experiment, start time (epoch ms), status, tags, params and last metrics."""
        from mlflow.exceptions import MlflowException

        try:
            r = self.client.get_run(run_id)
        except MlflowException as e:
            raise PaftError(f"MLflow run {run_id!r} not found at {self.uri} ({e.error_code})") from None
        return {"id": run_id, "name": r.info.run_name, "experiment_id": r.info.experiment_id,
                "start_time": r.info.start_time, "status": r.info.status, "tags": dict(r.data.tags),
                "params": dict(r.data.params), "metrics": dict(r.data.metrics)}

    def read_json(self, run_id: str, path: str) -> dict | None:
        """The JSON artifact ``path`` of a run (None when the run has none there)."""
        import json

        from mlflow.exceptions import MlflowException

        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(run_id, path, tmp)
            except (MlflowException, OSError):
                return None
            return json.loads(Path(local).read_text(encoding="utf-8"))

    def histories(self, run_id: str, keys) -> dict[str, list[list[float]]]:
        """The step-indexed curves ``keys`` of a run that it has: {key: [[step, value], ...]} by step."""
        logged = self.client.get_run(run_id).data.metrics
        return {k: [[m.step, m.value] for m in sorted(self.client.get_metric_history(run_id, k), key=lambda m: m.step)]
                for k in keys if k in logged}

    # ------------------------------------------------------------------ registry
    def register(self, run_id: str, artifact_path: str, name: str, tags: dict | None = None,
                 score: float | None = None, higher_is_better: bool = True) -> dict:
        """Register ``runs:/run_id/artifact_path`` as a new version of ``name`` and place it.

        The first version becomes ``champion``. A later one takes ``champion`` only when its ``score``
        (kept as the version's tag ``score``) beats the champion's; otherwise it becomes ``challenger``.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {**(tags or {}), **({"score": repr(float(score))} if score is not None else {})}
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        try:
            champion = self.client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            champion = None
        best = champion.tags.get("score") if champion else None
        if champion is None:
            alias = "champion"
        elif score is not None and best is not None:
            better = float(score) > float(best) if higher_is_better else float(score) < float(best)
            alias = "champion" if better else "challenger"
        else:
            alias = "challenger"  # nothing to compare: the champion stays
        self.client.set_registered_model_alias(name, alias, mv.version)
        return {"name": name, "version": int(mv.version), "alias": alias,
                "champion_score": float(best) if best is not None else None}

    def champion_tags(self, name: str) -> dict[str, str] | None:
        """The tags of registered model ``name``'s champion version (None when there is none)."""
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_model_version_by_alias(name, "champion").tags)
        except MlflowException:
            return None

    def run_url(self, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
        """The run's page in the MLflow UI: on the tracking server itself, else where ``ui_command`` serves."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else ui
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def children(self, parent_id: str, tags: bool = False) -> list[tuple]:
        """(name, run id) of the parent's child runs, oldest first; (name, run id, tags) with ``tags``."""
        experiment = self.client.get_run(parent_id).info.experiment_id
        runs = self.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'",
                                       order_by=["attributes.start_time ASC"])
        return [(r.info.run_name, r.info.run_id, *((dict(r.data.tags),) if tags else ())) for r in runs]

    def ui_command(self) -> str:
        exe = Path(sys.executable).with_name("mlflow")
        return f"{exe if exe.exists() else 'mlflow'} ui --backend-store-uri '{self.uri}' --port 5000"
