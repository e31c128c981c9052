"""The ``paft`` flow: the DAG only. prepare → base → (SFT ‖ alignment ‖ variants) → merges → (REC ‖ merge search ‖
sparsity) → evaluate every candidate → report (registry, markdown + HTML report, Prefect artifact)."""

from __future__ import annotations

import time
import uuid

from prefect import flow, runtime
from prefect.task_runners import ThreadPoolTaskRunner

from paft.config import load_params
from paft.evaluate.candidates import candidate, harness_includes, selected
from paft.tracking import Tracker, git_commit
from tasks import stages


@flow(name="paft", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def paft(params_path: str = "params.yaml", overrides: list[str] | None = None, only_if_new_data: bool = False) -> dict:
    """The whole pipeline. ``only_if_new_data`` (deployment ``paft/retrain``): prepare the data first and stop
    there when its version is the one recorded on the current champion model."""
    params = load_params(params_path, overrides)  # a bad value stops here, before any work
    harness_includes(params)  # so does a bad local lm-evaluation-harness task
    if params.orchestration.mode == "deployments":
        stages.check_train_deployment(params)
    if only_if_new_data:
        check = stages.check_data(params)
        if check["data_version"] == check["champion_data_version"]:
            print(f"data version {check['data_version']} is the champion's: nothing to retrain")
            return {"skipped": True, **check}
    run_dir = params.path(params.paths.output_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tracker = Tracker.from_params(params)
    parent = tracker.start(
        f"paft-{run_dir.name}",
        tags={
            "git_commit": git_commit(params.root),
            "prefect.flow_run_id": runtime.flow_run.id or "",
            "prefect.flow_run_url": runtime.flow_run.ui_url or "",
            "run_dir": str(run_dir),
        },
    )
    ok = False
    try:
        tracker.log_params(parent, params.flat())
        data = stages.prepare_data(params, parent)
        base = stages.base_model(params, data, parent)
        # the PAFT fan-out: every training job (SFT, alignment and their variants, e.g. SFT with L1, ORPO) at the
        # same time from the same base (orchestration.mode: here, or each as a flow run on the training work pool)
        inputs = {"data": data, "run_dir": str(run_dir), "parent_id": parent}
        futures = {job: stages.train.submit(params, job, inputs | {"base": base}) for job in params.train.jobs()}
        # the baseline PAFT replaces: alignment after SFT, from the SFT model (starts when SFT ends)
        seq_f = (stages.train.submit(params, "sequential", inputs | {"base": base, "sft": futures["sft"].result()})
                 if params.train.sequential else None)
        trained = {job: f.result() for job, f in futures.items()}
        merged = stages.merge(params, base, trained, str(run_dir), parent)
        rec_start = next(iter(merged.values()))["path"] if params.rec.base == "merged" else base["path"]
        rec_f = stages.train.submit(params, "rec", inputs | {"start_from": rec_start})
        # the merge search runs while REC trains (or after it, when REC judges the points too)
        search = stages.merge_search(params, base, trained, data, str(run_dir), parent,
                                     rec=rec_f.result() if params.merge.search.rec else None)
        deltas = trained | merged | ({"paft_search": search} if search else {})
        sparsity_f = stages.sparsity.submit(params, base, deltas, str(run_dir), parent)
        rec, seq = rec_f.result(), (seq_f.result() if seq_f else None)
        candidates = selected(params, [
            {"name": "base", "path": base["path"]},
            *(candidate(job, base["path"], t["path"]) for job, t in trained.items()),
            *([candidate("sequential", seq["start_model"], seq["path"])] if seq else []),
            *({"name": name, "path": m["path"]} for name, m in merged.items()),
            *([{"name": "paft_search", "path": search["path"]}] if search else []),
        ])
        sparsity = sparsity_f.result()
        results = stages.evaluate(params, candidates, rec, data, str(run_dir), parent, reference=base["path"],
                                  sparsity=sparsity)
        rep = stages.report(params, results, merged, search, rec, data, str(run_dir), parent)
        ok = True
    finally:
        tracker.end(parent, ok)
    return {
        "skipped": False,
        "parent_run_id": parent,
        "run_dir": str(run_dir),
        "data_version": data["data_version"],
        "results": results,
        "table": rep["table"],
        "verdict": rep["verdict"],
        "report": rep["report"],
        "search": search,
        "sparsity_table": sparsity["table"],
        "registered": rep["registered"],
        "timings": {job: {"start": t["start"], "end": t["end"]} for job, t in trained.items()},
        "mlflow_ui": tracker.ui_command(),
    }
