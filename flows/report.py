"""The ``paft-report`` flow: the experiment report of an earlier ``paft`` flow run, made again from MLflow.

``paft report RUN_ID`` runs it: the report (markdown, standalone HTML with charts) is written, logged to the
MLflow parent run ``run_id`` under ``report/`` and its summary published as the Prefect artifact ``paft-results``
of this flow run.
"""

from __future__ import annotations

from prefect import flow

from paft.config import load_params
from paft.evaluate.experiment import write_experiment_report
from paft.tracking import Tracker
from tasks.common import publish_results


@flow(name="paft-report", log_prints=True)
def paft_report(run_id: str, out_dir: str, params_path: str = "params.yaml", overrides: list[str] | None = None,
                log: bool = True) -> dict:
    """``run_id``: the MLflow parent run of a ``paft`` flow run (tracking store of ``params_path``)."""
    params = load_params(params_path, overrides)
    rep = write_experiment_report(Tracker.from_params(params), run_id, out_dir, log=log)
    publish_results(rep["summary"])
    return {k: rep[k] for k in ("html", "markdown", "verdict")}
