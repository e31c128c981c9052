#!/usr/bin/env python
"""The PAFT fan-out (SFT ‖ alignment) against the same two jobs one after the other, side by side in one run.

    .venv/bin/python bench/fanout.py                      # default: 8-11 min on 2 CPU cores
    .venv/bin/python bench/fanout.py --rounds 1 --sft-steps 20 --align-steps 10    # a smoke run, about 2 min
    .venv/bin/python bench/fanout.py --no-deployments     # without the work-pool mode (no workers)

Setup (not timed): a folder (--out) with a params file = the repo's params.yaml (the default run's two jobs:
SFT 300 steps, alignment 150, unless --sft-steps / --align-steps),
``resources.cpu_threads`` = cores // 2 (each job gets half the machine, as in the flow), ``orchestration.cache``
off (a second run would reuse the first), MLflow in a sqlite there; ``paft.data.prepare.prepare`` and
``paft.models.ensure_base`` (the tiny base is cached in .cache/paft). A temporary Prefect server with its own
PREFECT_HOME, and unless --no-deployments the work pool paft-gpu, ``prefect deploy --name gpu`` (prefect.yaml) and
two process workers ``prefect worker start --pool paft-gpu --limit 1`` polling every 2 s
(PREFECT_WORKER_QUERY_SECONDS=2; the default 10 s adds up to 10 s to every pick-up).

Modes, timed wall clock around the two jobs (rounds alternate their order, so a shared machine's drift hits all):
  sequential        ``launch(training_job(...))`` for SFT, then for alignment: no orchestration
  parallel_raw      both ``launch``ed at once from two threads: the best the fan-out can do
  flow_local        a flow (paft-fanout-bench) submitting ``stages.train`` for both on a ThreadPoolTaskRunner, as
                    the paft flow does in orchestration.mode local: MLflow child runs into which the jobs log their
                    curves and system metrics (the raw modes' jobs log nothing), persisted results
  flow_deployments  the same flow with orchestration.mode deployments: each job a flow run of paft-train/gpu
                    picked up by a worker (its own process), the parent polling it (run_deployment, every 2 s)
Overhead share = (wall - parallel_raw's wall) / wall: the share of an orchestrated run that is not the jobs
running side by side. A job's own time is its summary.json 'seconds' (model load to saved adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from common import ROOT  # noqa: E402  (project on the path, quiet libraries)

BIN = Path(sys.executable).parent
MODES = ("sequential", "parallel_raw", "flow_local", "flow_deployments")
JOBS = (("sft", "sft.jsonl"), ("align", "preference.jsonl"))
GOAL = 0.6
SERVER: list[subprocess.Popen] = []  # the Prefect server, once started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(path: str, body: dict | None = None):
    """A call to the Prefect server's REST API (GET, or POST with ``body``)."""
    req = urllib.request.Request(os.environ["PREFECT_API_URL"] + path, headers={"Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def start_prefect(work: Path, workers: int) -> float:
    """A Prefect server (+ pool, deployment, workers) for this process and its children; returns seconds taken."""
    t = time.perf_counter()
    url = f"http://127.0.0.1:{free_port()}/api"
    os.environ.update({"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": url,
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "2",
                       "PREFECT_LOGGING_LEVEL": "WARNING", "PATH": f"{BIN}:{os.environ['PATH']}"})
    os.environ.pop("PREFECT_API_KEY", None)

    def spawn(args: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "prefect"), *args], cwd=ROOT, stdout=(work / log).open("w"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    SERVER.append(spawn(["server", "start", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1].split("/")[0]],
                        "server.log"))
    while True:
        if SERVER[0].poll() is not None or time.perf_counter() - t > 180:
            raise RuntimeError(f"prefect server did not start (log {work / 'server.log'})")
        try:
            api("/health")
            break
        except OSError:
            time.sleep(0.5)
    setup_cmds = (["work-pool", "create", "paft-gpu", "--type", "process"], ["deploy", "--name", "gpu"])  # prefect.yaml
    for args in setup_cmds if workers else ():
        p = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        if p.returncode:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    procs = [spawn(["worker", "start", "--pool", "paft-gpu", "--limit", "1", "--name", f"bench-worker-{i}"],
                   f"worker-{i}.log") for i in range(workers)]
    while workers and sum(w["status"] == "ONLINE" for w in api("/work_pools/paft-gpu/workers/filter", {})) < workers:
        if time.perf_counter() - t > 300 or any(q.poll() is not None for q in procs + SERVER):
            raise RuntimeError(f"the workers did not come online (logs {work}/worker-*.log)")
        time.sleep(0.5)
    return time.perf_counter() - t


def stop_all(keep_server: bool = False) -> None:
    """End every process this bench started (server, workers, their flow runs, training jobs), by id."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    if keep_server:
        server = psutil.Process(SERVER[0].pid)
        kids = [p for p in kids if p not in (server, *server.children(recursive=True))]
    for p in kids:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(kids, timeout=10)
    for p in alive:
        p.kill()


def interrupted(signum, frame) -> None:
    """Ctrl-C, SIGTERM: end the jobs and workers at once, and mark their flow runs crashed (a flow mode's threads wait
    for them: run_deployment polls until a final state); the server stays until the flow has recorded its end."""
    stop_all(keep_server=bool(SERVER))
    for r in api("/flow_runs/filter", {"limit": 200}) if SERVER else ():
        if r["deployment_id"] and r["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"):
            api(f"/flow_runs/{r['id']}/set_state",
                {"state": {"type": "CRASHED", "message": "bench interrupted"}, "force": True})
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def setup(work: Path, sft_steps: int, align_steps: int):
    """Params file, data and tiny base: (params path, params, inputs of a training stage)."""
    import yaml

    from paft.config import load_params
    from paft.data.prepare import prepare
    from paft.models import ensure_base

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {**raw["paths"], "data_dir": "data", "output_dir": "runs",
                    "cache_dir": str(ROOT / ".cache" / "paft")}  # the tiny base, shared with make run
    for kind, steps in (("sft", sft_steps), ("align", align_steps)):
        raw["train"][kind]["max_steps"] = steps or raw["train"][kind]["max_steps"]
    raw["resources"] = {**raw.get("resources", {}), "cpu_threads": max(1, (os.cpu_count() or 2) // 2)}
    raw["orchestration"] = {"cache": False, "result_storage": "prefect-results"}
    raw["tracking"] = {**raw["tracking"], "uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts",
                       "register_models": False}
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(work / "params.yaml")
    data = prepare(params)
    base = ensure_base(params, data["path"])
    return work / "params.yaml", params, {"data": data, "base": base}


def make_flow():
    """The fan-out of flows/paft.py on its own (imported after the server's address is set)."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from paft.config import load_params
    from tasks import stages

    @flow(name="paft-fanout-bench", task_runner=ThreadPoolTaskRunner(max_workers=4))
    def fanout(params_path: str, overrides: list[str], inputs: dict) -> dict:
        params = load_params(params_path, overrides)
        futures = {kind: stages.train.submit(params, kind, inputs) for kind, _ in JOBS}
        return {kind: f.result() for kind, f in futures.items()}

    return fanout


def warmup() -> None:
    """A flow run submitting one task: Prefect's one-off costs in this process (client, task runner, results)."""
    from prefect import flow, task

    flow(name="paft-fanout-warmup")(lambda: task(name="noop")(lambda: None).submit().result())()


def run_mode(mode: str, ctx: dict, run_dir: Path) -> dict:
    """One timed run of ``mode``: wall seconds, each job's summary times, and when the jobs started and ended."""
    from paft.train.launch import launch, training_job

    params, inputs = ctx["params"], ctx["inputs"]
    run_dir.mkdir(parents=True)

    def raw(kind: str, file: str) -> dict:
        job = training_job(kind, params, inputs["base"]["path"], Path(inputs["data"]["path"]) / file, run_dir / kind)
        return launch(job, params.resources.python, gpus=params.resources.gpus_per_job)  # as stages._train does

    t0 = time.time()
    if mode == "sequential":
        jobs = {kind: raw(kind, file) for kind, file in JOBS}
    elif mode == "parallel_raw":
        jobs, threads = {}, [threading.Thread(target=lambda k, f: jobs.__setitem__(k, raw(k, f)), args=j) for j in JOBS]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if len(jobs) < len(JOBS):
            raise RuntimeError(f"parallel_raw: a job failed (logs in {run_dir})")
    else:
        parent = ctx["tracker"].start(f"fanout-{run_dir.name}")
        overrides = ["orchestration.mode=" + ("deployments" if mode == "flow_deployments" else "local")]
        jobs = ctx["flow"](str(ctx["params_path"]), overrides, inputs | {"run_dir": str(run_dir), "parent_id": parent})
        ctx["tracker"].end(parent)
    t1 = time.time()
    out = {"wall": t1 - t0, "jobs": {k: jobs[k]["seconds"] for k, _ in JOBS},
           "first_job_start_after": min(v["start"] for v in jobs.values()) - t0,
           "after_last_job_end": t1 - max(v["end"] for v in jobs.values())}
    if mode == "flow_deployments":  # where the time goes around each job: its paft-train flow run on the server
        ts = lambda iso: datetime.fromisoformat(iso).timestamp()  # noqa: E731
        out["flow_runs"] = {r["name"]: {"queued_to_running": ts(r["start_time"]) - ts(r["created"]),
                                        "running_to_job": jobs[r["name"]]["start"] - ts(r["start_time"]),
                                        "job_to_run_end": ts(r["end_time"]) - jobs[r["name"]]["end"]}
                            for r in api("/flow_runs/filter", {"limit": 200})
                            if r["deployment_id"] and r["parameters"]["inputs"]["run_dir"] == str(run_dir)}
    return out


def report(runs: dict[str, list[dict]]) -> tuple[str, float]:
    med = {m: statistics.median(r["wall"] for r in rs) for m, rs in runs.items()}
    seq, raw = med["sequential"], med["parallel_raw"]
    lines = ["| mode | wall s (median) | per round | × sequential | overhead (share) | SFT s | align s "
             "| first job starts after s | ends after last job s |", "|---|---|---|---|---|---|---|---|---|"]
    for m, rs in runs.items():
        over = f"{med[m] - raw:.1f} s ({(med[m] - raw) / med[m]:.0%})" if m.startswith("flow") else "–"
        cols = [statistics.median(r["jobs"][k] for r in rs) for k, _ in JOBS]
        cols += [statistics.median(r[k] for r in rs) for k in ("first_job_start_after", "after_last_job_end")]
        per_round = " ".join(f"{r['wall']:.1f}" for r in rs)
        lines.append(f"| {m} | {med[m]:.1f} | {per_round} | {med[m] / seq:.2f} | {over} | "
                     + " | ".join(f"{c:.1f}" for c in cols) + " |")
    if "flow_deployments" in runs:
        fr = [j for r in runs["flow_deployments"] for j in r["flow_runs"].values()]
        lines.append("\nflow_deployments, median over its jobs: flow run created → Running (worker pick-up, process "
                     f"start, flow import) {statistics.median(j['queued_to_running'] for j in fr):.1f} s; Running → "
                     f"job's own start (task, MLflow run, the training process's start) "
                     f"{statistics.median(j['running_to_job'] for j in fr):.1f} s; job end → flow run end "
                     f"{statistics.median(j['job_to_run_end'] for j in fr):.1f} s")
    fan = med.get("flow_deployments", med.get("flow_local"))
    return "\n".join(lines), fan / seq


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds over all modes, order alternating (2)")
    p.add_argument("--sft-steps", type=int, help="SFT optimizer steps (default: params.yaml's, 300)")
    p.add_argument("--align-steps", type=int, help="alignment (DPO) steps (default: params.yaml's, 150)")
    p.add_argument("--no-deployments", action="store_true", help="skip flow_deployments (no work pool, no workers)")
    p.add_argument("--out", help="working and results folder (default bench/results/fanout-<stamp>/)")
    a = p.parse_args(argv)
    if min(a.rounds, a.sft_steps or 1, a.align_steps or 1) < 1:
        p.error("--rounds, --sft-steps and --align-steps must be at least 1")
    work = Path(a.out or ROOT / "bench" / "results" / f"fanout-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    modes = MODES[:3] if a.no_deployments else MODES
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    started, load_start = time.perf_counter(), os.getloadavg()
    print(f"paft fan-out bench in {work}; load {load_start[0]:.2f} on {os.cpu_count()} cores", flush=True)
    try:
        t = time.perf_counter()
        params_path, params, inputs = setup(work, a.sft_steps, a.align_steps)
        print(f"setup: data + tiny base ({'cached' if inputs['base']['cached'] else 'pretrained'}) "
              f"{time.perf_counter() - t:.1f} s; SFT {params.train.sft.max_steps} steps, alignment "
              f"{params.train.align.max_steps} steps, {params.resources.cpu_threads} thread(s) per job", flush=True)
        print(f"prefect server{'' if a.no_deployments else ', pool, deployment, 2 workers'}: "
              f"{start_prefect(work, 0 if a.no_deployments else 2):.1f} s", flush=True)
        from paft.tracking import Tracker
        from tasks import stages

        if not a.no_deployments:
            stages.check_train_deployment(params)
        ctx = {"params_path": params_path, "params": params, "inputs": inputs, "flow": make_flow(),
               "tracker": Tracker.from_params(params)}
        t = time.perf_counter()
        warmup()
        print(f"first flow run in this process (untimed warm-up): {time.perf_counter() - t:.1f} s", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.rounds):
            for m in modes if r % 2 == 0 else modes[::-1]:
                runs[m].append(run_mode(m, ctx, work / "runs" / f"r{r + 1}-{m}"))
                x = runs[m][-1]
                print(f"  round {r + 1}/{a.rounds}  {m:17} {x['wall']:6.1f} s  (jobs: "
                      + ", ".join(f"{k} {s:.1f} s" for k, s in x["jobs"].items()) + ")", flush=True)
    finally:
        stop_all()
    table, ratio = report(runs)
    load = os.getloadavg()
    print(f"\n{table}\n\nfan-out / sequential: {ratio:.2f} (goal <= {GOAL} with two workers; "
          f"{'flow_local' if a.no_deployments else 'flow_deployments'})")
    print(f"wall time {time.perf_counter() - started:.0f} s; load now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(), "load_start": load_start,
            "load_end": load, "sft_steps": params.train.sft.max_steps, "align_steps": params.train.align.max_steps,
            "cpu_threads": params.resources.cpu_threads, "rounds": a.rounds, "worker_query_seconds": 2}
    (work / "fanout.json").write_text(json.dumps({"meta": meta, "runs": runs, "ratio": ratio}, indent=1) + "\n")
    (work / "fanout.md").write_text(table + "\n")
    print(f"written: {work / 'fanout.json'}, {work / 'fanout.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
