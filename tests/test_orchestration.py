"""Resume and concurrency: a rerun after a failure reuses the finished training jobs; two flow runs at once."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from paft.config import load_params
from tests.conftest import ROOT, write_params


def key(params, task_name: str, **inputs) -> str | None:
    from tasks.cache import TrainingCache

    ctx = SimpleNamespace(task=SimpleNamespace(name=task_name))
    return TrainingCache().compute_key(ctx, {"params": params, **inputs}, {})


def test_training_cache_key_is_the_job_not_the_flow_run(tmp_path):
    path = write_params(tmp_path)
    p = load_params(path)
    data = {"path": str(tmp_path / "data"), "data_version": "v1", "counts": {"sft": 64}}
    base = {"path": str(tmp_path / "base"), "cached": False, "pretrain_loss_last": 3.2}
    k = key(p, "train_sft", base=base, data=data, run_dir=str(tmp_path / "run1"), parent_id="a")
    # another flow run (run folder, MLflow parent), a cached base, other merge or evaluation settings: same job
    assert k == key(p, "train_sft", base=base | {"cached": True, "pretrain_loss_last": 0}, data=data,
                    run_dir=str(tmp_path / "run2"), parent_id="b")
    assert k == key(load_params(path, ["merge.density=0.2", "evaluate.max_examples=3"]), "train_sft", base=base, data=data,
                    run_dir=str(tmp_path / "run1"), parent_id="a")
    # what changes the job's output: its config, the seed, the data version, the base, the stage
    others = [
        key(load_params(path, ["train.sft.lr=0.1"]), "train_sft", base=base, data=data, run_dir="r", parent_id="a"),
        key(load_params(path, ["seed=3"]), "train_sft", base=base, data=data, run_dir="r", parent_id="a"),
        key(p, "train_sft", base=base, data=data | {"data_version": "v2"}, run_dir="r", parent_id="a"),
        key(p, "train_sft", base={"path": "other"}, data=data, run_dir="r", parent_id="a"),
        key(p, "train_align", base=base, data=data, run_dir="r", parent_id="a"),
    ]
    assert len({k, *others}) == 6
    # alignment does not depend on the SFT config
    assert key(p, "train_align", base=base, data=data, run_dir="r", parent_id="a") == key(
        load_params(path, ["train.sft.lr=0.1"]), "train_align", base=base, data=data, run_dir="r", parent_id="a")
    assert key(load_params(path, ["orchestration.cache=false"]), "train_sft", base=base, data=data, run_dir="r",
               parent_id="a") is None


def test_a_model_written_by_this_flow_run_is_keyed_by_its_content(tmp_path):
    p = load_params(write_params(tmp_path))
    data = {"path": "d", "data_version": "v1"}
    keys = []
    for run, weights in (("run1", b"same"), ("run2", b"same"), ("run3", b"other")):
        merged = tmp_path / run / "merged_ties"
        merged.mkdir(parents=True)
        (merged / "model.safetensors").write_bytes(weights)
        keys.append(key(p, "train_rec", start_from=str(merged), data=data, run_dir=str(tmp_path / run), parent_id=run))
    assert keys[0] == keys[1] != keys[2]


def _children(params, parent_id: str) -> dict[str, object]:
    client = MlflowClient(params.tracking_uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
def test_a_rerun_after_a_failed_merge_reuses_the_finished_training_jobs(tmp_path, prefect_harness, monkeypatch):
    import paft.merge.io
    from flows.paft import paft as paft_flow

    path = write_params(tmp_path, {"train": {"sequential": False}})
    params = load_params(path)

    def broken(*args, **kwargs):
        raise RuntimeError("merge failed on purpose")

    monkeypatch.setattr(paft.merge.io, "merge_models", broken)  # what the flow's merge step (run_recipe) calls
    with pytest.raises(RuntimeError, match="on purpose"):
        paft_flow(params_path=str(path), overrides=[])
    (first,) = (tmp_path / "outputs").iterdir()
    assert (first / "sft" / "summary.json").is_file() and (first / "align" / "summary.json").is_file()
    monkeypatch.undo()

    out = paft_flow(params_path=str(path), overrides=[])
    run_dir = Path(out["run_dir"])
    assert run_dir != first
    assert not (run_dir / "sft").exists() and not (run_dir / "align").exists()  # not trained again
    assert (run_dir / "merged_ties" / "model.safetensors").is_file() and (run_dir / "rec").is_dir()
    first_sft = json.loads((first / "sft" / "summary.json").read_text())
    assert out["timings"]["sft"]["start"] == first_sft["start"]  # the first run's job
    children = _children(params, out["parent_run_id"])
    assert children["train_sft"].data.tags["paft.cached_from_run"]  # recorded, pointing at the job's own run
    assert children["train_align"].data.tags["paft.cached_from_run"]
    assert "paft.cached_from_run" not in children["train_rec"].data.tags  # REC had not run: it trained now

    # a cached job whose output was removed since trains again; a code or config change trains again
    import shutil

    shutil.rmtree(first / "align")
    third = paft_flow(params_path=str(path), overrides=["train.sft.lr=0.002"])
    third_dir = Path(third["run_dir"])
    assert (third_dir / "align" / "summary.json").is_file() and (third_dir / "sft" / "summary.json").is_file()
    children = _children(params, third["parent_run_id"])
    assert "paft.cached_from_run" not in children["train_align"].data.tags
    assert "paft.cached_from_run" not in children["train_sft"].data.tags


@pytest.mark.slow
def test_two_flow_runs_at_once_never_clash(tmp_path, prefect_harness):
    """Two `paft run` processes on one project folder (same data, MLflow store and outputs folder), at once."""
    from prefect.settings import PREFECT_API_URL

    path = write_params(tmp_path, {"train": {"sequential": False}, "orchestration": {"cache": False}})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    procs = [subprocess.Popen([sys.executable, "-m", "paft.cli", "run", "--params", str(path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    params = load_params(path)
    client = MlflowClient(params.tracking_uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    run_dirs = {r.data.tags["run_dir"] for r in parents}
    assert len(run_dirs) == 2  # each under its own run folder
    for parent in parents:
        run_dir = Path(parent.data.tags["run_dir"])
        children = _children(params, parent.info.run_id)
        assert {"train_sft", "train_align", "merge_ties", "train_rec", "evaluate"} <= set(children)
        assert all(c.info.status == "FINISHED" for c in children.values())
        # each run's jobs wrote into its own folder, and every output is whole
        for stage in ("sft", "align", "rec"):
            assert json.loads((run_dir / f"{stage}.job.json").read_text())["out"] == str(run_dir / stage)
        for sub in ("sft", "align", "rec", "merged_ties", "evaluation"):
            assert (run_dir / sub).is_dir(), sub
        assert not list(run_dir.glob("*.tmp-*"))
    versions = client.search_model_versions(f"name = '{params.tracking.model_name}'")
    assert len(versions) == 2  # both registered; one champion
    assert client.get_model_version_by_alias(params.tracking.model_name, "champion").version in {v.version for v in versions}


@pytest.mark.slow
def test_deployments_mode_without_the_training_deployment_stops_before_any_work(tmp_path, prefect_harness):
    from flows.paft import paft as paft_flow
    from paft.errors import ConfigError

    path = write_params(tmp_path, {"orchestration": {"mode": "deployments", "train_deployment": "paft-train/nowhere"}})
    with pytest.raises(ConfigError, match="orchestration.train_deployment: no deployment 'paft-train/nowhere'"):
        paft_flow(params_path=str(path), overrides=[])
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()
