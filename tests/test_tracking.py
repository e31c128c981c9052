import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from paft.tracking import Tracker


def _mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); returns (process, uri)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("mlflow server did not come up in 120 s")


@pytest.fixture(params=["sqlite", pytest.param("server", marks=[pytest.mark.slow, pytest.mark.integration])])
def tracker(request, tmp_path):
    if request.param == "sqlite":
        yield Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "artifacts")
        return
    proc, uri = _mlflow_server(tmp_path)
    try:
        tracker = Tracker(uri, "exp", tmp_path / "ignored")
        assert not (tmp_path / "ignored").exists()
        yield tracker
        assert tracker.run_url("r").startswith(f"{uri}/#/experiments/")
        assert any((tmp_path / "server-artifacts").rglob("config.json"))  # artifacts went to the server's store
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _version(tracker, tmp_path, score, higher_is_better=True):
    run = tracker.start("merge")
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    tracker.log_artifacts(run, tmp_path / "model", "model")
    tracker.end(run)
    return tracker.register(run, "model", "paft-model", {"data_version": "v"}, score=score, higher_is_better=higher_is_better)


def test_champion_moves_only_when_a_new_version_beats_it(tracker, tmp_path):
    first = _version(tracker, tmp_path, 0.5)
    assert (first["version"], first["alias"]) == (1, "champion")
    worse = _version(tracker, tmp_path, 0.4)
    assert (worse["version"], worse["alias"], worse["champion_score"]) == (2, "challenger", 0.5)
    better = _version(tracker, tmp_path, 0.6)
    assert (better["version"], better["alias"]) == (3, "champion")
    client = tracker.client
    assert client.get_model_version_by_alias("paft-model", "champion").version in (3, "3")
    assert client.get_model_version_by_alias("paft-model", "challenger").version in (2, "2")
    assert client.get_model_version("paft-model", "3").tags["score"] == "0.6"


def test_lower_is_better_and_missing_scores(tracker, tmp_path):
    assert _version(tracker, tmp_path, 2.0, higher_is_better=False)["alias"] == "champion"
    assert _version(tracker, tmp_path, 1.0, higher_is_better=False)["alias"] == "champion"
    assert _version(tracker, tmp_path, None)["alias"] == "challenger"  # nothing to compare: the champion stays


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Two `paft run` on a fresh project race on MLflow's schema migrations unless the store is opened in turn."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    code = ("import sys; from paft.tracking import Tracker; "
            f"t = Tracker({uri!r}, 'paft', {str(tmp_path / 'artifacts')!r}); print(t.experiment_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-800:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one experiment, created once
