"""Prefect tasks: thin wrappers that call ``paft``, log to MLflow and return paths and metrics."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from paft.config import Params
from tasks.cache import TrainingCache
from tasks.common import publish_results, record_cached, stage_run


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_data(params: Params, parent_id: str) -> dict:
    from paft.data.prepare import prepare

    with stage_run(params, parent_id, "prepare") as (tracker, run_id):
        result = prepare(params)
        tracker.log_params(run_id, {f"data.{k}": v for k, v in params.flat().items() if k.startswith("data.")})
        tracker.log_metrics(run_id, {f"rows_{k}": v for k, v in result["counts"].items()})
        tracker.set_tags(run_id, {"data_version": result["data_version"]})
        tracker.set_tags(parent_id, {"data_version": result["data_version"]})
        tracker.log_artifacts(run_id, Path(result["path"]) / "summary.json", "data")
    return result


@task(name="check_data", cache_policy=NO_CACHE)
def check_data(params: Params) -> dict:
    """The data version the prepare stage gives now, and the one recorded on the current champion model."""
    from paft.data.prepare import prepare
    from paft.tracking import Tracker

    version = prepare(params)["data_version"]
    champion = Tracker.from_params(params).champion_tags(params.tracking.model_name) or {}
    return {"data_version": version, "champion_data_version": champion.get("data_version")}


@task(name="base_model", cache_policy=NO_CACHE)
def base_model(params: Params, data: dict, parent_id: str) -> dict:
    from paft.models import ensure_base

    with stage_run(params, parent_id, "base_model") as (tracker, run_id):
        result = ensure_base(params, data["path"])
        tracker.log_params(run_id, {"base": params.model.base, "path": result["path"], "cached": result["cached"]})
        tracker.log_metrics(run_id, {k: v for k, v in result.items() if k.startswith(("pretrain_", "parameters"))})
    return result


def killed(task, task_run, state) -> bool:
    """Retry a training task only when its job was killed by a signal (it resumes from its last checkpoint);
    a real error fails at once."""
    from paft.errors import JobKilled

    return isinstance(state.data, JobKilled)


# a killed job (OOM, preemption) is retried after 10 s, then 60 s; it resumes from its last checkpoint.
# A finished job is cached (tasks/cache.py): a rerun of the flow reuses it.
TRAINING = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": killed,
            "cache_policy": TrainingCache(), "persist_result": True}


def _train(job_name: str, params: Params, base: str, data_file: Path, out: Path, parent_id: str, name: str | None = None) -> dict:
    from paft.train.launch import launch, training_job

    with stage_run(params, parent_id, name or f"train_{job_name}") as (tracker, run_id):
        job = training_job(job_name, params, base, data_file, out)
        tracker.log_params(run_id, {f"cfg.{k}": v for k, v in job.cfg.items()} | {"base": base})
        res = params.resources
        accelerate_config = str(params.path(res.accelerate_config)) if res.accelerate_config else None
        # the trainer's MLflow callback logs the curves, and MLflow the system metrics, into this stage's run
        summary = launch(job, res.python, gpus=res.gpus_per_job, accelerate_config=accelerate_config,
                         mlflow_run=tracker.for_job(run_id))
        history = summary.pop("log_history", [])
        if summary.get("resumed_from"):  # a retry has a run of its own: add the steps the killed attempt logged
            tracker.log_history(run_id, history, until_step=int(summary["resumed_from"].split("-")[-1]))
        tracker.log_metrics(run_id, {k: v for k, v in summary.items() if k not in ("start", "end", "pid")})
        tracker.log_metrics(run_id, {f"dropped_{k}": v for k, v in summary.get("dropped", {}).items()})
        tracker.log_params(run_id, {"start": summary["start"], "end": summary["end"]})
        tracker.log_artifacts(run_id, out, "model" if job.kind == "rec" else "adapter")
    return {"path": str(out), "run_id": run_id, **summary}


@task(name="train_sft", **TRAINING)
def train_sft(params: Params, base: dict, data: dict, run_dir: str, parent_id: str, job: str = "sft") -> dict:
    """SFT job ``job`` (train.sft or a variant of it) on the SFT rows."""
    return _train(job, params, base["path"], Path(data["path"]) / "sft.jsonl", Path(run_dir) / job, parent_id)


@task(name="train_align", **TRAINING)
def train_align(params: Params, base: dict, data: dict, run_dir: str, parent_id: str, job: str = "align") -> dict:
    """Alignment job ``job`` (train.align or a variant: DPO and its losses, ORPO) on the preference pairs."""
    return _train(job, params, base["path"], Path(data["path"]) / "preference.jsonl", Path(run_dir) / job, parent_id)


@task(name="train_sequential", **TRAINING)
def train_sequential(params: Params, base: dict, sft: dict, data: dict, run_dir: str, parent_id: str) -> dict:
    """The baseline PAFT replaces: alignment starting from the SFT model."""
    from paft.train.export import model_folder

    m = params.model
    start = model_folder(base["path"], sft["path"], Path(run_dir) / "sft_model", m.dtype, m.trust_remote_code)
    out = _train("align", params, start, Path(data["path"]) / "preference.jsonl", Path(run_dir) / "sequential", parent_id,
                 name="train_sequential")
    return {**out, "start_model": start}


@task(name="train_rec", **TRAINING)
def train_rec(params: Params, start_from: str, data: dict, run_dir: str, parent_id: str) -> dict:
    return _train("rec", params, start_from, Path(data["path"]) / "rec.jsonl", Path(run_dir) / "rec", parent_id)


STAGES = {"sft": train_sft, "align": train_align, "sequential": train_sequential, "rec": train_rec}


def result_storage(params: Params):
    """Where the training tasks persist their results (the cache records): a folder, or a Prefect storage block."""
    o = params.orchestration
    return o.result_storage_block or params.path(o.result_storage).resolve()


def _stage_task(params: Params, stage: str, inputs: dict):
    """(task, inputs) of stage ``stage``: "sequential", "rec", or a training job of the fan-out (its kind's task
    with the job's name)."""
    if stage in ("sequential", "rec"):
        return STAGES[stage], inputs
    return STAGES[params.train.jobs()[stage]], inputs | {"job": stage}


def run_training(params: Params, stage: str, inputs: dict) -> dict:
    """Training stage ``stage`` (a job of params.train.jobs(): "sft", "align", a variant; or "sequential", "rec")
    in this process. A job an earlier flow run finished with the same key is reused and recorded as a child MLflow
    run pointing at the job's own run; if its output folder has been removed since, the job trains again."""
    task, inputs = _stage_task(params, stage, inputs)
    job = task.with_options(result_storage=result_storage(params))
    state = job(params, **inputs, return_state=True)
    result = state.result()
    if state.name == "Cached":
        if (Path(result["path"]) / "summary.json").is_file():
            print(f"{job.name}: reusing the finished job {result['path']}")
            record_cached(params, inputs["parent_id"], f"train_{inputs['job']}" if "job" in inputs else job.name, result)
        else:
            print(f"{job.name}: the cached output {result['path']} is gone; training again")
            result = job.with_options(refresh_cache=True)(params, **inputs)
    return result


def result_file(run_dir: str, stage: str) -> Path:
    """Where a training flow run of deployments mode leaves its result for the parent."""
    return Path(run_dir) / f"{stage}.result.json"


def run_training_deployment(params: Params, stage: str, inputs: dict) -> dict:
    """Training stage ``stage`` as a flow run of ``orchestration.train_deployment`` (on its work pool's workers);
    waits for it and reads the result it leaves in the run folder (storage the workers share)."""
    from prefect.deployments import run_deployment

    from paft.errors import StageError
    from paft.io import read_json

    name = params.orchestration.train_deployment
    result_file(inputs["run_dir"], stage).unlink(missing_ok=True)
    run = run_deployment(name, parameters={"stage": stage, "params": params.model_dump(mode="json", by_alias=True),
                                           "root": params.root, "inputs": inputs},
                         timeout=None, poll_interval=2)
    if not run.state.is_completed():
        raise StageError(f"{stage} training: flow run {run.name} ({run.id}) of deployment {name} ended "
                         f"{run.state.name}{': ' + run.state.message if run.state.message else ''}")
    return read_json(result_file(inputs["run_dir"], stage))


def check_train_deployment(params: Params) -> None:
    """In deployments mode, stop before any work when the training deployment is not on the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from paft.errors import ConfigError

    name = params.orchestration.train_deployment
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(f"orchestration.train_deployment: no deployment {name!r} on the Prefect server at "
                              f"{PREFECT_API_URL.value() or '(temporary server)'}; run `prefect deploy --all` "
                              "(prefect.yaml) or set orchestration.mode: local") from None


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{stage}")
def train(params: Params, stage: str, inputs: dict) -> dict:
    """One training stage, here or on the training work pool (``orchestration.mode``)."""
    if params.orchestration.mode == "deployments":
        return run_training_deployment(params, stage, inputs)
    return run_training(params, stage, inputs)


def _merge(params: Params, tracker, run_id: str, base: dict, inputs: list[tuple[str, float, float]], method: str,
           out: Path) -> dict:
    """One merge of ``inputs`` ((path, weight, density) each) into the base by ``method``, written to ``out``;
    logs its settings and recipe to ``run_id``. A :class:`~paft.merge.recipe.Recipe` run by ``run_recipe``, the
    code ``paft merge`` runs; ``recipe.yaml`` redoes it (``paft merge --recipe recipe.yaml --out DIR``)."""
    from paft.merge.recipe import Recipe, RecipeInput, run_recipe
    from paft.models import local_path

    cfg = params.merge
    recipe = Recipe(method=method, base=str(local_path(base["path"])),
                    inputs=[RecipeInput(path=p, weight=w, density=d) for p, w, d in inputs], lambda_=cfg.lambda_,
                    seed=params.seed, sign=cfg.sign, normalize=cfg.normalize, rescale=cfg.rescale)
    summary = run_recipe(recipe, out)
    tracker.log_params(run_id, {"method": method, "density": inputs[0][2], "lambda": cfg.lambda_,
                                "sft_weight": inputs[0][1], "align_weight": inputs[1][1],
                                **{k: summary[k] for k in ("sign", "normalize", "rescale")}})
    tracker.log_text(run_id, recipe.to_yaml(), "recipe.yaml")
    return summary


@task(name="merge", cache_policy=NO_CACHE)
def merge(params: Params, base: dict, trained: dict[str, dict], run_dir: str, parent_id: str) -> dict[str, dict]:
    """The PAFT merges (``merge_plan``: every method over every SFT × alignment job pair) → a model folder each;
    returns {candidate name: {path, run_id, summary, method, sft, align}}; the first is "the" PAFT model."""
    from paft.evaluate.candidates import merge_plan

    cfg = params.merge
    out: dict[str, dict] = {}
    for name, (method, sft, align) in merge_plan(params).items():
        suffix = name.removeprefix("paft_")
        with stage_run(params, parent_id, f"merge_{suffix}") as (tracker, run_id):
            path = Path(run_dir) / f"merged_{suffix}"
            inputs = [(trained[sft]["path"], cfg.sft_weight, cfg.density), (trained[align]["path"], cfg.align_weight, cfg.density)]
            summary = _merge(params, tracker, run_id, base, inputs, method, path)
            tracker.log_params(run_id, {"sft_job": sft, "align_job": align})
            tracker.log_artifacts(run_id, path, "model")
            out[name] = {"path": str(path), "run_id": run_id, "summary": summary, "method": method, "sft": sft, "align": align}
    return out


@task(name="merge_search", cache_policy=NO_CACHE)
def merge_search(params: Params, base: dict, trained: dict[str, dict], data: dict, run_dir: str, parent_id: str,
                 rec: dict | None = None) -> dict | None:
    """The merge search (``merge.search``): each point merged, scored on the validation sets (``val_*``, apart from
    the evaluation's; judged by REC too with ``merge.search.rec``) and logged as a child run of the ``merge_search``
    run, so that MLflow's compare view shows the whole search; only the best point's model is kept (and logged, for
    the registry). None when the budget is 0."""
    import shutil

    from paft.evaluate.candidates import evaluate_all, reference_logprobs
    from paft.evaluate.report import score_label, with_score
    from paft.merge.search import search_points

    cfg, weights = params.merge.search, params.evaluate.score
    if not cfg.budget:
        return None
    points = search_points(cfg.methods, cfg.densities, cfg.weights, budget=cfg.budget, strategy=cfg.strategy, seed=params.seed)
    folder = Path(run_dir) / "search"
    reference = reference_logprobs(params, base["path"], data["path"], split="val")  # once for every point
    best: dict | None = None
    rows = []
    with stage_run(params, parent_id, "merge_search") as (tracker, search_id):
        tracker.log_params(search_id, {"budget": cfg.budget, "strategy": cfg.strategy, "points": len(points),
                                       "sft_job": cfg.sft, "align_job": cfg.align, "objective": score_label(weights)})
        for point in points:
            with stage_run(params, search_id, point.name, {"paft.stage": "merge_search_point"}) as (_, run_id):
                path = folder / point.name
                inputs = [(trained[job]["path"], w, point.density) for job, w in zip((cfg.sft, cfg.align), point.weights)]
                _merge(params, tracker, run_id, base, inputs, point.method, path)
                metrics = with_score(evaluate_all(params, [{"name": point.name, "path": str(path)}],
                                                  rec["path"] if cfg.rec and rec else None, data["path"],
                                                  folder / f"{point.name}.evaluation", reference=reference,
                                                  harness=False, split="val"), weights)[point.name]
                tracker.log_metrics(run_id, metrics)
                row = {"name": point.name, "method": point.method, "density": point.density,
                       "weights": list(point.weights), "metrics": metrics, "run_id": run_id, "path": str(path)}
                rows.append(row)
                if best is None or metrics.get("score", float("-inf")) > best["metrics"].get("score", float("-inf")):
                    if best:
                        shutil.rmtree(best["path"], ignore_errors=True)
                    best = row
                else:
                    shutil.rmtree(path, ignore_errors=True)  # only the best merge is kept
        tracker.log_artifacts(best["run_id"], best["path"], "model")
        tracker.set_tags(search_id, {"best": best["name"]})
        tracker.log_metrics(search_id, {f"best_{k}": v for k, v in best["metrics"].items()})
        result = {"objective": score_label(weights), "best": best["name"], "path": best["path"],
                  "run_id": best["run_id"], "search_run_id": search_id, "points": rows}
        tracker.log_dict(search_id, result, "search.json")
    return result


@task(name="sparsity", cache_policy=NO_CACHE)
def sparsity(params: Params, base: dict, trained: dict[str, dict], run_dir: str, parent_id: str) -> dict:
    """Share of near-zero entries in each trained or merged delta (per module and overall), histograms, JSON report."""
    from paft.models import local_path
    from paft.train.sparsity import format_table, sparsity_report

    with stage_run(params, parent_id, "sparsity") as (tracker, run_id):
        out = Path(run_dir) / "sparsity"
        # merged full models are measured on the tensors the merge changed, like the adapters on their modules
        report = sparsity_report(local_path(base["path"]), {k: v["path"] for k, v in trained.items()}, out,
                                 eps_abs=params.sparsity.eps_abs, eps_rel=params.sparsity.eps_rel, skip_unchanged=True)
        metrics = {f"{name}/{k}": v for name, o in report["overall"].items() for k, v in o.items()}
        tracker.log_metrics(run_id, metrics)
        tracker.log_metrics(parent_id, {f"sparsity/{k}": v for k, v in metrics.items() if k.endswith(("share_abs", "share_rel"))})
        tracker.log_artifacts(run_id, out, "sparsity")
        tracker.log_text(run_id, format_table(report), "sparsity.md")
    return {"overall": report["overall"], "table": format_table(report), "path": str(out)}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(params: Params, candidates: list[dict], rec: dict, data: dict, run_dir: str, parent_id: str,
             reference: str | None = None, sparsity: dict | None = None) -> dict:
    """Every candidate's metrics, with its score, alignment tax and delta sparsity; REC's own quality.
    ``reference``: the model the implicit reward is measured against (the base)."""
    from paft.evaluate.candidates import evaluate_all, reference_logprobs
    from paft.evaluate.report import with_alignment_tax, with_score, with_sparsity

    with stage_run(params, parent_id, "evaluate") as (tracker, run_id):
        out = Path(run_dir) / "evaluation"
        ref = reference_logprobs(params, reference, data["path"]) if reference else None
        results = evaluate_all(params, candidates, rec["path"], data["path"], out, reference=ref)
        results = with_sparsity(results, (sparsity or {}).get("overall", {}))
        results = with_alignment_tax(with_score(results, params.evaluate.score), tuple(params.train.jobs()))
        for name, metrics in results.items():
            tracker.log_metrics(run_id, {f"{name}/{k}": v for k, v in metrics.items()})
            tracker.log_metrics(parent_id, {f"{name}/{k}": v for k, v in metrics.items()})
        tracker.log_artifacts(run_id, out, "evaluation")
        tracker.log_dict(parent_id, results, "results.json")
    return results


def _score(results: dict, row: str, key: str, metric: str) -> float:
    from paft.errors import ConfigError

    if metric not in results.get(row, {}):
        raise ConfigError(f"tracking.{key}: {metric!r} is not a metric of {row} (known: {', '.join(sorted(results.get(row, {})))})")
    return results[row][metric]


@task(name="report", cache_policy=NO_CACHE)
def report(params: Params, results: dict, merged: dict, search: dict | None, rec: dict, data: dict, run_dir: str,
           parent_id: str) -> dict:
    """Model registration (the best PAFT merge; REC), the experiment report (markdown + HTML with charts, logged to
    MLflow) and the Prefect artifact ``paft-results`` (verdict, table, links to every MLflow run)."""
    from paft.evaluate.experiment import write_experiment_report
    from paft.evaluate.report import results_table
    from paft.tracking import Tracker

    tracker = Tracker.from_params(params)
    registered = {}
    if params.tracking.register_models:
        t = params.tracking
        tags = {"data_version": data["data_version"]}
        runs = {n: v["run_id"] for n, v in merged.items()} | ({"paft_search": search["run_id"]} if search else {})
        scores = {n: _score(results, n, "promote_metric", t.promote_metric) for n in runs if n in results}
        if scores:  # the best PAFT merge (of the plan and the search) is the new version
            best = max(scores, key=scores.get)
            registered["model"] = tracker.register(runs[best], "model", t.model_name, tags | {"candidate": best},
                                                   score=scores[best])
        registered["rec"] = tracker.register(rec["run_id"], "model", t.rec_model_name, tags,
                                             score=_score(results, "rec", "rec_promote_metric", t.rec_promote_metric))
    rep = write_experiment_report(tracker, parent_id, Path(run_dir) / "report")
    publish_results(rep["summary"])
    return {"table": results_table(results), "registered": registered, "report": rep["html"], "verdict": rep["verdict"]}
