"""README's server path, exactly: server, process work pool, `prefect deploy --all`, worker, `deployment run`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from paft.config import load_params
from tests.conftest import ROOT, write_params

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("PREFECT_API_KEY", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    procs = [server]
    try:
        wait_healthy(env["PREFECT_API_URL"], server)
        yield env, procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


def prefect(env, *args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([BIN / "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_deployment_full_runs_on_a_process_worker(tmp_path, prefect_server):
    env, procs = prefect_server
    params_path = write_params(tmp_path / "run")
    prefect(env, "work-pool", "create", "paft-process", "--type", "process")
    prefect(env, "work-pool", "create", "paft-gpu", "--type", "process")
    prefect(env, "deploy", "--all")
    schedules = prefect(env, "deployment", "schedule", "ls", "paft/full").stdout
    assert "0 3 * * 1" in schedules and "False" in schedules, schedules  # weekly cron, inactive
    worker_log = (tmp_path / "worker.log").open("w")
    procs.append(subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "paft-process"], cwd=ROOT, env=env,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True))
    run = prefect(env, "deployment", "run", "paft/full", "--param", f"params_path={params_path}", "--watch",
                  "--watch-timeout", "600", timeout=700)
    assert "Completed" in run.stdout, run.stdout + (tmp_path / "worker.log").read_text()[-3000:]

    params = load_params(params_path)
    client = MlflowClient(params.tracking_uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    parents = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    flow_run_id = parents[0].data.tags["prefect.flow_run_id"]
    assert flow_run_id and flow_run_id in run.stdout
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {"train_sft", "train_align", "merge_ties", "train_rec", "evaluate"} <= {r.info.run_name for r in children}


def test_deployment_has_an_inactive_weekly_schedule():
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (full,) = [d for d in spec["deployments"] if d["name"] == "full"]
    assert full["entrypoint"] == "flows.paft:paft"
    (schedule,) = full["schedules"]
    assert schedule["active"] is False and len(schedule["cron"].split()) == 5


def test_retrain_deployment_runs_the_same_flow_only_on_new_data():
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (retrain,) = [d for d in spec["deployments"] if d["name"] == "retrain"]
    assert retrain["entrypoint"] == "flows.paft:paft" and retrain["parameters"]["only_if_new_data"] is True
    (schedule,) = retrain["schedules"]
    assert schedule["active"] is False and len(schedule["cron"].split()) == 5


def api_post(env, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_deployments_mode_trains_on_two_workers_at_once_and_the_parent_waits(tmp_path, prefect_server):
    """orchestration.mode deployments: SFT and alignment are runs of paft-train/gpu, picked up by two process
    workers (one job each at a time); they overlap in time, and the parent merges only after both ended."""
    from datetime import datetime

    env, procs = prefect_server
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    steps = {"max_steps": 40, "save_steps": 100}
    params_path = write_params(tmp_path / "run", {"orchestration": {"mode": "deployments"},
                                                  "train": {"sft": steps, "align": steps}})
    prefect(env, "work-pool", "create", "paft-gpu", "--type", "process")
    prefect(env, "work-pool", "create", "paft-process", "--type", "process")
    prefect(env, "deploy", "--all")
    logs = []
    for i in range(2):
        logs.append(tmp_path / f"worker-{i}.log")
        procs.append(subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "paft-gpu", "--limit", "1",
                                       "--name", f"gpu-worker-{i}"], cwd=ROOT, env=env, stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    run = subprocess.run([BIN / "paft", "run", "--params", str(params_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    worker_logs = [p.read_text() for p in logs]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + "".join(w[-2000:] for w in worker_logs)

    flow_runs = api_post(env, "/flow_runs/filter", {"limit": 50})
    children = {r["name"]: r for r in flow_runs if r["deployment_id"]}
    assert set(children) == {"sft", "align", "sequential", "rec"}
    assert all(r["state"]["type"] == "COMPLETED" and r["parent_task_run_id"] for r in children.values())
    (parent,) = [r for r in flow_runs if not r["deployment_id"]]
    t = {k: (datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for k, r in children.items()}
    assert t["sft"][0] < t["align"][1] and t["align"][0] < t["sft"][1], t  # the fan-out overlaps
    # each worker runs one job at a time, so overlapping jobs ran on different workers
    ran_on = {name: [i for i, w in enumerate(worker_logs) if r["id"] in w] for name, r in children.items()}
    assert ran_on["sft"] != ran_on["align"] and all(len(v) == 1 for v in ran_on.values()), ran_on

    params = load_params(params_path)
    client = MlflowClient(params.tracking_uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    (mlflow_parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert mlflow_parent.data.tags["prefect.flow_run_id"] == parent["id"]
    stage_runs = {r.info.run_name: r for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{mlflow_parent.info.run_id}'")}
    assert {"train_sft", "train_align", "train_sequential", "train_rec", "merge_ties", "evaluate"} <= set(stage_runs)
    merge_start = stage_runs["merge_ties"].info.start_time / 1000
    assert merge_start >= max(t["sft"][1].timestamp(), t["align"][1].timestamp()) - 1  # the parent waited for both
