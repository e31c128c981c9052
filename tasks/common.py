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
