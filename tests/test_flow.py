"""The whole flow, in-process, on the micro config: every stage runs and MLflow holds the record."""

import json

import pytest
from mlflow.tracking import MlflowClient

from paft.config import load_params
from tests.conftest import write_params

pytestmark = pytest.mark.slow

# every kind of candidate: SFT with L1 and ORPO beside SFT and DPO, merges of both SFT jobs, a merge search
EXPERIMENT = {"train": {"variants": {"sft_l1": {"from": "sft", "l1": {"weight": 0.05}}, "orpo": {"from": "align", "method": "orpo"}}},
              "merge": {"sft": ["sft", "sft_l1"], "search": {"budget": 2, "methods": ["ties"], "densities": [0.3, 0.7],
                                                            "weights": [[1.0, 1.0]], "sft": "sft_l1"}},
              "evaluate": {"harness_tasks": ["world_mc"], "harness_include": ["world_mc.jsonl"]}}
CANDIDATES = {"base", "sft", "sft_l1", "align", "orpo", "sequential", "paft_ties", "paft_task_arithmetic", "paft_ties_l1",
              "paft_task_arithmetic_l1", "paft_search"}


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory, prefect_harness):
    from flows.paft import paft

    folder = tmp_path_factory.mktemp("flow")
    params_path = write_params(folder, EXPERIMENT)
    # a local lm-evaluation-harness task from a JSONL file (evaluate.harness_include)
    rows = [{"question": f"Which river is named {w}?", "choices": [w, "Tass", "Mole"], "answer": 0} for w in ("Oru", "Pel")]
    (folder / "world_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = paft(params_path=str(params_path), overrides=[])
    return out, load_params(params_path)


def test_flow_runs_every_stage_and_reports_every_candidate(flow_run):
    out, params = flow_run
    assert set(out["results"]) == CANDIDATES | {"rec"}
    for name in CANDIDATES:
        row = out["results"][name]
        assert 0 <= row["task_em"] <= 1 and 0 <= row["pref_accuracy"] <= 1 and row["task_loss"] > 0
        assert "rec_faithfulness_parse_rate" in row and "pref_reward_accuracy" in row
        assert row["harness_world_mc_acc"] in (0, 0.5, 1)  # the local harness task's two questions
        assert row["score"] == pytest.approx(row["task_em"] + row["pref_accuracy"])  # evaluate.score's default
        best = max(out["results"][s]["task_em"] for s in ("sft", "sft_l1", "align", "orpo"))
        assert row["tax_task_em"] == pytest.approx(best - row["task_em"])  # alignment tax vs the single stages
        if name not in ("base", "sequential"):  # every trained or merged delta is measured
            assert 0 <= row["delta_sparsity"] <= 1
    assert out["results"]["base"]["pref_reward_accuracy"] == 0  # its own reference: every reward is 0
    assert set(out["results"]["rec"]) >= {"rec_parse_rate", "rec_rating_accuracy", "rec_citations_verified", "rec_pair_accuracy",
                                         "rec_pair_position_consistency", "rec_injection_flip_rate"}
    assert "| paft_ties |" in out["table"] and "harness_world_mc_acc" in out["table"].splitlines()[0]
    assert "| sft |" in out["sparsity_table"] and "| align |" in out["sparsity_table"]


def test_sft_and_alignment_overlap_in_time(flow_run):
    t = flow_run[0]["timings"]
    assert t["sft"]["start"] < t["align"]["end"] and t["align"]["start"] < t["sft"]["end"], t


def test_merged_models_load_and_differ_from_base(flow_run):
    import torch
    from transformers import AutoModelForCausalLM

    out, params = flow_run
    from pathlib import Path

    run_dir = Path(out["run_dir"])
    base = AutoModelForCausalLM.from_pretrained(next((Path(params.path(params.paths.cache_dir))).glob("base-*")))
    for method in ("ties", "task_arithmetic"):
        merged = AutoModelForCausalLM.from_pretrained(run_dir / f"merged_{method}")
        w0 = base.model.layers[0].self_attn.q_proj.weight
        w1 = merged.model.layers[0].self_attn.q_proj.weight
        assert w0.shape == w1.shape and not torch.equal(w0, w1)
    assert (run_dir / "sft" / "adapter_model.safetensors").is_file()
    assert (run_dir / "align" / "summary.json").is_file()
    assert (run_dir / "rec" / "model.safetensors").is_file()
    assert not list(run_dir.glob("*.checkpoints"))  # removed once the outputs are whole
    # the sequential baseline starts from the SFT model, not from the base
    seq = __import__("json").loads((run_dir / "sequential.job.json").read_text())
    assert seq["base"] == str(run_dir / "sft_model") and (run_dir / "sequential" / "adapter_config.json").is_file()


def test_mlflow_holds_parent_children_tags_metrics_and_registry(flow_run):
    out, params = flow_run
    client = MlflowClient(params.tracking_uri, registry_uri=params.tracking_uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data_version"] == out["data_version"]
    assert parent.data.tags["git_commit"] and parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["train.sft.max_steps"] == "6"
    assert "paft_ties/task_em" in parent.data.metrics
    exp = client.get_experiment_by_name(params.tracking.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {r.info.run_name for r in children}
    assert names == {"prepare", "base_model", "train_sft", "train_sft_l1", "train_align", "train_orpo", "merge_ties",
                     "merge_task_arithmetic", "merge_ties_l1", "merge_task_arithmetic_l1", "merge_search",
                     "train_rec", "train_sequential", "sparsity", "evaluate"}
    orpo = next(r for r in children if r.info.run_name == "train_orpo")
    assert orpo.data.params["cfg.method"] == "orpo" and orpo.data.params["cfg.lr"] == parent.data.params["train.align.lr"]
    l1 = next(r for r in children if r.info.run_name == "train_sft_l1")
    assert l1.data.params["cfg.l1"].startswith("{'weight': 0.05") and "l1_penalty" in l1.data.metrics
    sft = next(r for r in children if r.info.run_name == "train_sft")
    assert len(client.get_metric_history(sft.info.run_id, "loss")) >= 2  # the loss curve, by the trainer's callback
    assert client.get_metric_history(sft.info.run_id, "system/cpu_utilization_percentage")  # system metrics
    align = next(r for r in children if r.info.run_name == "train_align")
    assert "rewards/accuracies" in align.data.metrics
    assert any(a.path == "adapter" for a in client.list_artifacts(sft.info.run_id))
    for name in (params.tracking.model_name, params.tracking.rec_model_name):
        mv = client.get_model_version_by_alias(name, "champion")
        assert int(mv.version) == 1 and mv.tags["data_version"] == out["data_version"]
    # the registered model is the best PAFT merge by tracking.promote_metric (score)
    mv = client.get_model_version_by_alias(params.tracking.model_name, "champion")
    paft = {n: r["score"] for n, r in out["results"].items() if n.startswith("paft_")}
    assert paft[mv.tags["candidate"]] == max(paft.values()) and float(mv.tags["score"]) == pytest.approx(max(paft.values()))


def test_merge_search_points_are_child_runs_of_the_search_and_the_best_is_a_candidate(flow_run):
    out, params = flow_run
    client = MlflowClient(params.tracking_uri)
    search = out["search"]
    assert [p["name"] for p in search["points"]] == ["ties-d0.3-w1-1", "ties-d0.7-w1-1"]
    exp = client.get_experiment_by_name(params.tracking.experiment)
    points = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{search['search_run_id']}'")
    assert {r.info.run_name for r in points} == {"ties-d0.3-w1-1", "ties-d0.7-w1-1"}
    for r in points:  # what MLflow's compare view shows: the point's settings and its scores
        assert r.data.params["method"] == "ties" and r.data.params["density"] in ("0.3", "0.7")
        assert {"score", "task_em", "pref_accuracy"} <= set(r.data.metrics)
    best = max(search["points"], key=lambda p: p["metrics"]["score"])
    assert search["best"] == best["name"] and out["results"]["paft_search"]["task_em"] == best["metrics"]["task_em"]
    from pathlib import Path

    kept = sorted(p.name for p in (Path(out["run_dir"]) / "search").iterdir() if not p.name.endswith(".evaluation"))
    assert kept == [best["name"]]  # only the best merge is kept, and logged for the registry
    # scored on the validation set, not on the evaluation's held-out tasks the results table reports
    from paft.io import read_jsonl

    data = Path(params.path(params.paths.data_dir))
    judged = {r["prompt"] for r in read_jsonl(Path(out["run_dir"]) / "search" / f"{best['name']}.evaluation" /
                                              f"generations_{best['name']}.jsonl")}
    assert judged and judged <= {r["prompt"] for r in read_jsonl(data / "val_tasks.jsonl")}
    assert not judged & {r["prompt"] for r in read_jsonl(data / "eval_tasks.jsonl")}
    assert any(a.path == "model" for a in client.list_artifacts(best["run_id"]))


def test_report_is_written_logged_and_made_again_from_mlflow(flow_run, tmp_path):
    from paft.cli import main

    out, params = flow_run
    from pathlib import Path

    html = Path(out["report"]).read_text()
    assert "Verdict" in html and "paft_ties_l1" in html and html.count('<figure class="chart"') >= 10
    client = MlflowClient(params.tracking_uri)
    logged = {a.path for a in client.list_artifacts(out["parent_run_id"], "report")}
    assert {"report/report.html", "report/report.md", "report/charts"} <= logged
    # from the MLflow store alone, in another folder
    rc = main(["report", out["parent_run_id"], "--params", str(Path(params.root) / "params.yaml"),
               "--out", str(tmp_path / "again"), "--no-log", "--no-artifact"])
    assert rc == 0
    md = (tmp_path / "again" / "report.md").read_text()
    assert out["table"].split("\n\n")[0] in md  # the candidate table, as the flow printed it
    assert sorted(p.name for p in (tmp_path / "again" / "charts").iterdir()) == sorted(
        p.name for p in (Path(out["report"]).parent / "charts").iterdir())


def test_prefect_artifact_holds_the_table_with_links_to_the_mlflow_runs(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out, params = flow_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["paft-results"])))
    markdown = max(arts, key=lambda a: a.created).data
    assert "| paft_ties |" in markdown and "sequential" in markdown and out["verdict"] in markdown
    mlflow = MlflowClient(params.tracking_uri)
    children = mlflow.search_runs([mlflow.get_run(out["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{out['parent_run_id']}'")
    assert {"train_sft", "train_align", "evaluate"} <= {r.info.run_name for r in children}
    for run in [mlflow.get_run(out["parent_run_id"]), *children]:
        assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in markdown


def test_retraining_runs_only_when_the_data_version_differs_from_the_champions(flow_run):
    from flows.paft import paft
    from tasks import stages

    out, params = flow_run
    from pathlib import Path

    path = Path(params.root) / "params.yaml"
    same = paft(params_path=str(path), overrides=[], only_if_new_data=True)
    assert same["skipped"] and same["data_version"] == same["champion_data_version"] == out["data_version"]
    new = stages.check_data.fn(load_params(path, ["data.seed=7"]))
    assert new["champion_data_version"] == out["data_version"] != new["data_version"]  # new data: the flow goes on


def test_report_flow_publishes_the_summary_as_a_prefect_artifact(flow_run, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.report import paft_report

    out, params = flow_run
    from pathlib import Path

    rep = paft_report(out["parent_run_id"], str(tmp_path / "rep"), str(Path(params.root) / "params.yaml"), log=False)
    assert rep["verdict"] == out["verdict"] and Path(rep["html"]).is_file()
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["paft-results"])))
        latest = max(arts, key=lambda a: a.created)
        assert client.read_flow_run(latest.flow_run_id).name and out["verdict"] in latest.data
        assert client.read_flow(client.read_flow_run(latest.flow_run_id).flow_id).name == "paft-report"
