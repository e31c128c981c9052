"""The experiment report of one flow run, read back from MLflow: ``paft report RUN_ID`` and the flow's last step.

Everything comes from the MLflow parent run and its children, so the report can be made again at any time
from the tracking store alone: the candidates' metrics (``results.json`` on the parent), the merge search
(``search.json`` on the ``merge_search`` run, its points as that run's children), the delta sparsity
(``sparsity/sparsity.json`` on the ``sparsity`` run) and the training curves (each ``train_*`` run's history;
a job reused from an earlier flow run is read from its own run).
"""

from __future__ import annotations

import time
from pathlib import Path

from paft.errors import PaftError
from paft.evaluate.report import rec_table, results_table, verdict

CURVES = ("loss", "task_loss", "l1_penalty", "rewards/accuracies", "rewards/margins")


def collect(tracker, run_id: str) -> dict:
    """The report's data (see :func:`paft.evaluate.page.write_report`) of the flow run whose MLflow parent is ``run_id``."""
    run = tracker.run(run_id)
    results = tracker.read_json(run_id, "results.json")
    if results is None:
        raise PaftError(f"MLflow run {run_id} has no results.json: not a finished paft flow run (status {run['status']})")
    children = tracker.children(run_id, tags=True)
    by_name = {name: (rid, tags) for name, rid, tags in children}
    data = {
        "title": f"PAFT experiment {run['name']}",
        "run": {"id": run_id, "url": tracker.run_url(run_id), "name": run["name"],
                "start_time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run["start_time"] / 1000)),
                "tags": {k: v for k, v in run["tags"].items() if not k.startswith("mlflow.")}},
        "results": results,
        "table": results_table(results, rec=False),
        "links": [[name, tracker.run_url(rid)] for name, rid, _ in children],
    }
    if any(k.startswith("rec") for k in results):
        data["rec_table"] = rec_table(results)
    v = verdict(results)
    if v:
        data["verdict"] = v
    if "merge_search" in by_name:
        search = tracker.read_json(by_name["merge_search"][0], "search.json")
        if search:
            for p in search["points"]:
                p["url"] = tracker.run_url(p["run_id"])
            data["search"] = search
    if "sparsity" in by_name:
        report = tracker.read_json(by_name["sparsity"][0], "sparsity/sparsity.json")
        if report:
            hists = report.get("histograms", {})
            data["sparsity"] = {"eps_abs": report["eps_abs"], "eps_rel": report["eps_rel"],
                                "inputs": {n: {"overall": o, **({"histogram": hists[n]} if n in hists else {})}
                                           for n, o in report["overall"].items()}}
    curves = {}
    for name, (rid, tags) in by_name.items():
        if tags.get("paft.stage", "").startswith("train_"):
            c = tracker.histories(tags.get("paft.cached_from_run") or rid, CURVES)
            if c:
                curves[name] = c
    if curves:
        data["curves"] = curves
    return data


def summary_markdown(data: dict) -> str:
    """The short markdown the flow publishes as its Prefect artifact: verdict, table, search's best, links."""
    parts = [f"# {data['title']}", f"MLflow parent run [{data['run']['id']}]({data['run']['url']})"]
    if "verdict" in data:
        parts.append(f"**{data['verdict']['text']}**")
    parts.append(data["table"])
    if "rec_table" in data:
        parts.append(data["rec_table"])
    if "search" in data:
        s = data["search"]
        parts.append(f"Merge search: {len(s['points'])} merges, best {s['best']} ({s['objective']}).")
    parts.append("## MLflow runs of the stages\n\n" + "\n".join(f"- [{n}]({u})" for n, u in data["links"]))
    return "\n\n".join(parts) + "\n"


def write_experiment_report(tracker, run_id: str, out_dir: str | Path, log: bool = True) -> dict:
    """Write the report of the flow run ``run_id`` (markdown, standalone HTML, charts) to ``out_dir``; with ``log``
    also log it to that MLflow run under ``report/``. Returns the page's paths plus ``data``, ``summary`` (the
    markdown of the Prefect artifact) and ``verdict`` (its text, None without one)."""
    from paft.evaluate.page import write_report

    data = collect(tracker, run_id)
    paths = write_report(data, out_dir)
    if log:
        tracker.log_artifacts(run_id, out_dir, "report")
    return {**paths, "data": data, "summary": summary_markdown(data), "verdict": data.get("verdict", {}).get("text")}
