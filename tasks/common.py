"""What every Prefect task shares: a child MLflow run around the stage's work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from paft.config import Params
from paft.tracking import Tracker


@contextlib.contextmanager
def stage_run(params: Params, parent_id: str, name: str, tags: dict | None = None) -> Iterator[tuple[Tracker, str]]:
    """A child run of ``parent_id`` named ``name``; marked FAILED if the stage raises."""
    tracker = Tracker.from_params(params)
    run_id = tracker.start(name, parent_id, {"paft.stage": name, **(tags or {})})
    try:
        yield tracker, run_id
    except BaseException:
        tracker.end(run_id, ok=False)
        raise
    tracker.end(run_id)


def record_cached(params: Params, parent_id: str, name: str, result: dict) -> None:
    """A training job reused from an earlier flow run: a child run named like the stage, tagged with the job's run."""
    tracker = Tracker.from_params(params)
    run_id = tracker.start(name, parent_id, {"paft.stage": name, "paft.cached_from_run": result.get("run_id", "")})
    tracker.log_params(run_id, {"path": result["path"]})
    tracker.log_metrics(run_id, {k: v for k, v in result.items() if k in ("steps", "seconds", "train_loss_first", "train_loss_last")})
    tracker.end(run_id)


def publish_results(markdown: str) -> None:
    """The experiment's summary (verdict, candidate table, links to the MLflow runs) as the Prefect artifact
    ``paft-results``: in the flow run's Artifacts tab, and the latest under Artifacts → paft-results."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="paft-results", description="PAFT candidates compared")
