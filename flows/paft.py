"""The ``paft`` flow: the DAG only. prepare → base → (SFT ‖ alignment) → merge → REC → evaluate → report."""

from __future__ import annotations

import time
import uuid

from prefect import flow, runtime
from prefect.task_runners import ThreadPoolTaskRunner

from paft.config import load_params
from paft.evaluate.candidates import candidate
from paft.tracking import Tracker, git_commit
from tasks import stages


@flow(name="paft", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def paft(params_path: str = "params.yaml", overrides: list[str] | None = None, only_if_new_data: bool = False) -> dict:
    """The whole pipeline. ``only_if_new_data`` (deployment ``paft/retrain``): prepare the data first and stop
    there when its version is the one recorded on the current champion model."""
    params = load_params(params_path, overrides)  # a bad value stops here, before any work
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
        # the PAFT fan-out: SFT and alignment train at the same time, from the same base (orchestration.mode:
        # here, or each as a flow run on the training work pool)
        inputs = {"data": data, "run_dir": str(run_dir), "parent_id": parent}
        sft_f = stages.train.submit(params, "sft", inputs | {"base": base})
        align_f = stages.train.submit(params, "align", inputs | {"base": base})
        sft = sft_f.result()
        # the baseline PAFT replaces: alignment after SFT, from the SFT model (starts when SFT ends)
        seq_f = stages.train.submit(params, "sequential", inputs | {"base": base, "sft": sft}) if params.train.sequential else None
        align = align_f.result()
        sparsity_f = stages.sparsity.submit(params, base, {"sft": sft, "align": align}, str(run_dir), parent)
        merged = stages.merge(params, base, sft, align, str(run_dir), parent)
        rec_start = merged[params.merge.methods[0]]["path"] if params.rec.base == "merged" else base["path"]
        rec = stages.train(params, "rec", inputs | {"start_from": rec_start})
        seq = seq_f.result() if seq_f else None
        candidates = [
            {"name": "base", "path": base["path"]},
            candidate("sft", base["path"], sft["path"]),
            candidate("align", base["path"], align["path"]),
            *([candidate("sequential", seq["start_model"], seq["path"])] if seq else []),
            *({"name": f"paft_{m}", "path": v["path"]} for m, v in merged.items()),
        ]
        results = stages.evaluate(params, candidates, rec, data, str(run_dir), parent)
        rep = stages.report(params, results, merged, rec, data, parent)
        sparsity = sparsity_f.result()
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
        "sparsity_table": sparsity["table"],
        "registered": rep["registered"],
        "timings": {k: {"start": v["start"], "end": v["end"]} for k, v in (("sft", sft), ("align", align))},
        "mlflow_ui": tracker.ui_command(),
    }
