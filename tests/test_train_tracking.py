"""Training jobs report to the MLflow run they are given: the trainer's MLflowCallback logs the curves at their
global steps, MLflow samples system metrics while the job runs, the parent can still log into the run and end it,
a resumed job goes on in the same run, and a job given no run logs nothing."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest

from paft.config import load_params
from paft.train.common import Job, MlflowRun, trainer_args
from paft.train.launch import launch, training_job
from paft.tracking import Tracker
from tests.conftest import write_params
from tests.test_train import kill_at_checkpoint

SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "artifacts")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from paft.data.prepare import prepare
    from paft.models import ensure_base

    folder = tmp_path_factory.mktemp("train-tracking")
    params = load_params(write_params(folder))
    data = prepare(params)
    return folder, data, ensure_base(params, data["path"])["path"]


def _steps(tracker, run_id, key):
    return [m.step for m in tracker.client.get_metric_history(run_id, key)]


def _log_problems(job: Job) -> list[str]:
    """Lines of the job's log where MLflow logging failed (the callback logs asynchronously: it does not raise)."""
    log = Path(job.out).parent / f"{Path(job.out).name}.log"
    return [ln for ln in log.read_text().splitlines() if "Failed to log" in ln or "MlflowException" in ln]


def test_a_job_reports_to_mlflow_only_when_it_has_a_run(tmp_path):
    params = load_params(write_params(tmp_path))
    job = training_job("sft", params, "base", "data.jsonl", tmp_path / "out")
    assert job.mlflow is None and trainer_args(job)["report_to"] == "none"
    job.mlflow = asdict(MlflowRun("sqlite:///x.db", "r1", "1"))
    assert trainer_args(job)["report_to"] == ["mlflow"]
    job.save(tmp_path / "job.json")
    assert Job.load(tmp_path / "job.json").mlflow_run == MlflowRun("sqlite:///x.db", "r1", "1", 2.0)
    old = {k: v for k, v in json.loads((tmp_path / "job.json").read_text()).items() if k != "mlflow"}
    (tmp_path / "old.json").write_text(json.dumps(old))  # a job file written before the field existed
    assert Job.load(tmp_path / "old.json").mlflow is None


FAKE_TRAINER = """#!/usr/bin/env python3
# stands in for the interpreter: records the MLflow environment and job file its job got
import json, os, sys
job = json.load(open(sys.argv[-1]))
os.makedirs(job["out"], exist_ok=True)
env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
json.dump({"env": env, "mlflow": job["mlflow"]}, open(os.path.join(job["out"], "summary.json"), "w"))
"""


def test_launch_hands_the_run_to_the_subprocess_in_its_environment_and_job_file(tmp_path, tracker, monkeypatch):
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    params = load_params(write_params(tmp_path))
    run_id = tracker.start("train_sft")
    run = tracker.for_job(run_id)
    assert (run.tracking_uri, run.run_id, run.experiment_id, run.system_metrics_interval) == \
        (tracker.uri, run_id, tracker.experiment_id, 2.0)
    got = launch(training_job("sft", params, "base", "d.jsonl", tmp_path / "a"), str(fake), mlflow_run=run)
    assert got["env"] == {"MLFLOW_TRACKING_URI": tracker.uri, "MLFLOW_RUN_ID": run_id,
                          "MLFLOW_EXPERIMENT_ID": tracker.experiment_id, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
                          "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2.0"}
    assert got["mlflow"] == asdict(run)  # in the job file too: rerunning it by hand logs into the same run
    as_dict = launch(training_job("sft", params, "base", "d.jsonl", tmp_path / "b"), str(fake),
                     mlflow_run={"tracking_uri": "sqlite:///y.db", "run_id": "r", "experiment_id": "3",
                                 "system_metrics_interval": 0.5})
    assert as_dict["env"]["MLFLOW_RUN_ID"] == "r" and as_dict["env"]["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] == "0.5"
    none = launch(training_job("sft", params, "base", "d.jsonl", tmp_path / "c"), str(fake))
    assert none == {"env": {}, "mlflow": None}
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
    assert tracker.for_job(run_id).system_metrics_interval == 5.0


def test_log_history_names_the_curves_as_the_trainer_callback_does(tracker):
    run_id = tracker.start("train_align")
    history = [{"loss": 0.7, "rewards/chosen": 0.1, "grad_norm(x)": 1.0, "epoch": 0.5, "step": 2},
               {"loss": 0.6, "rewards/chosen": 0.2, "epoch": 1.0, "step": 4},
               {"train_runtime": 3.0, "step": 4}]
    tracker.log_history(run_id, history, until_step=2)
    assert _steps(tracker, run_id, "loss") == [2]
    tracker.log_history(run_id, history[1:])
    data = tracker.client.get_run(run_id).data.metrics
    assert data["loss"] == 0.6 and data["rewards/chosen"] == 0.2 and data["grad_norm_x_"] == 1.0 and data["epoch"] == 1.0
    assert _steps(tracker, run_id, "loss") == [2, 4] and "step" not in data


@pytest.mark.slow
def test_sft_and_dpo_curves_and_system_metrics_land_in_their_runs(prepared, tracker):
    """Both jobs at once into one store (as the flow runs them); then the parent logs and ends the runs."""
    folder, data, base = prepared
    p = load_params(write_params(folder / "tracked", {"train": {"sft": {"max_steps": 6, "logging_steps": 2},
                                                                "align": {"max_steps": 6, "logging_steps": 2}}}))
    parent = tracker.start("flow")
    runs = {kind: tracker.start(f"train_{kind}", parent) for kind in ("sft", "align")}
    jobs = {kind: training_job(kind, p, base, Path(data["path"]) / file, folder / f"tracked-{kind}")
            for kind, file in (("sft", "sft.jsonl"), ("align", "preference.jsonl"))}
    for kind, job in jobs.items():
        tracker.log_params(runs[kind], {f"cfg.{k}": v for k, v in job.cfg.items()} | {"base": base})
    with ThreadPoolExecutor(2) as pool:
        summaries = dict(zip(jobs, pool.map(lambda k: launch(jobs[k], mlflow_run=tracker.for_job(runs[k], 0.5)), jobs)))

    for kind, run_id in runs.items():
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == f"train_{kind}"  # ended by the job, not renamed
        assert run.data.tags["mlflow.parentRunId"] == parent
        history = [h for h in summaries[kind]["log_history"] if "loss" in h]
        for key in ("loss", "learning_rate", "grad_norm"):
            assert _steps(tracker, run_id, key) == [2, 4, 6], key  # at the trainer's global steps
        curve = sorted(tracker.client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        assert [m.value for m in curve] == pytest.approx([h["loss"] for h in history])
        assert all(_steps(tracker, run_id, key) for key in SYSTEM), sorted(run.data.metrics)  # sampled while training
        assert run.data.params["max_steps"] == "6" and run.data.params["cfg.max_steps"] == "6"  # trainer's and parent's
        assert not _log_problems(jobs[kind])
    align = tracker.client.get_run(runs["align"]).data.metrics
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(align)
    assert _steps(tracker, runs["align"], "rewards/accuracies") == [2, 4, 6]

    # the parent goes on logging into the finished runs (none of its params clash with the trainer's) and sets the status
    for kind, run_id in runs.items():
        s = summaries[kind]
        tracker.log_params(run_id, {"start": s["start"], "end": s["end"]})
        tracker.log_metrics(run_id, {k: v for k, v in s.items() if k not in ("start", "end", "pid")})
        tracker.set_tags(run_id, {"paft.stage": f"train_{kind}"})
    tracker.end(runs["sft"])
    tracker.end(runs["align"], ok=False)
    assert tracker.client.get_run(runs["sft"]).info.status == "FINISHED"
    assert tracker.client.get_run(runs["align"]).info.status == "FAILED"
    assert tracker.client.get_run(runs["sft"]).data.metrics["steps"] == 6


@pytest.mark.slow
def test_a_job_given_no_run_logs_nothing_to_mlflow(prepared, tracker, tmp_path):
    folder, data, base = prepared
    p = load_params(write_params(folder / "untracked", {"train": {"sft": {"max_steps": 2}}}))
    job = training_job("sft", p, base, Path(data["path"]) / "sft.jsonl", folder / "untracked-sft")
    stray = tmp_path / "stray.db"  # where MLflow would log, had the trainer reported to it
    summary = launch(job, env={"MLFLOW_TRACKING_URI": f"sqlite:///{stray}", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"})
    assert summary["steps"] == 2
    assert json.loads((folder / "untracked-sft.job.json").read_text())["mlflow"] is None
    assert not stray.exists()
    assert tracker.client.search_runs([tracker.experiment_id]) == []


@pytest.mark.slow
def test_a_killed_job_goes_on_logging_into_the_same_run_when_rerun(prepared, tracker):
    """SIGKILL mid-run leaves the run RUNNING; the rerun resumes from the checkpoint and the run: the trainer's params
    are logged again unchanged (no error), the curve reaches the last step, system metrics continue their steps."""
    folder, data, base = prepared
    steps = 24
    p = load_params(write_params(folder / "resume", {"train": {"sft": {"max_steps": steps, "save_steps": 4, "logging_steps": 4}}}))
    run_id = tracker.start("train_sft")
    run = tracker.for_job(run_id, 0.5)
    job = training_job("sft", p, base, Path(data["path"]) / "sft.jsonl", folder / "resume-sft")
    job.mlflow = asdict(run)
    with (folder / "resume-first.log").open("w") as log:
        done = kill_at_checkpoint(job, folder / "resume-sft.job.json", log=log, env={**os.environ, **run.env()})
    before = tracker.client.get_run(run_id)
    assert before.info.status == "RUNNING" and 4 in _steps(tracker, run_id, "loss")
    system_before = _steps(tracker, run_id, SYSTEM[0])

    summary = launch(job, mlflow_run=run)
    assert summary["resumed_from"] == f"checkpoint-{done}" and summary["steps"] == steps
    after = tracker.client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.params == before.data.params and len(after.data.params) > 50
    assert sorted(set(_steps(tracker, run_id, "loss"))) == list(range(4, steps + 1, 4))
    system = _steps(tracker, run_id, SYSTEM[0])
    assert len(system) > len(system_before) and len(set(system)) == len(system)  # resumed numbering, no step twice
    assert not _log_problems(job)
