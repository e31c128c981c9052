"""DVC: the `prepare` stage of dvc.yaml, its params dependencies, experiments and the default local remote.

The slow tests run the real `dvc` (the venv's) in a temporary git repository holding a copy of the files
DVC needs (paft/, dvc.yaml, .dvc/config, .dvcignore, .gitignore) and a tiny params.yaml. HOME and the
DVC config/cache folders point into the temporary folder, so no user or site setting leaks in or out.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from paft.io import hash_dir
from tests.conftest import write_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: paft and dvc are there
# the keys paft/data/prepare.py reads (data.seed, data.sources, data.eval_fraction, rec.dimensions, rec.sources)
PREPARE_PARAMS = {"data", "rec.dimensions", "rec.sources"}


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- fast: the committed files
def test_prepare_stage_lists_exactly_the_params_prepare_reads_and_params_yaml_has_them():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare"]
    assert set(stage["params"]) == PREPARE_PARAMS
    assert stage["outs"] == ["data/processed"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in PREPARE_PARAMS:  # DVC stops with "Parameters ... are missing" otherwise
        _get(params, key)
    assert params["paths"]["data_dir"] == "data/processed"  # where the flow reads what the stage writes


def test_default_remote_is_a_gitignored_local_folder():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    assert cfg["core"]["analytics"] == "false"
    url = cfg[f"'remote \"{cfg['core']['remote']}\"'"]["url"]
    assert "://" not in url and not Path(url).is_absolute()
    folder = (ROOT / ".dvc" / url).resolve()  # DVC resolves a relative url against .dvc/
    assert folder.parent == ROOT
    rel = folder.relative_to(ROOT).as_posix()
    assert subprocess.run(["git", "check-ignore", "-q", f"{rel}/x"], cwd=ROOT).returncode == 0, f"{rel} not git-ignored"
    assert f"/{rel}/" in (ROOT / ".dvcignore").read_text().split()


# ----------------------------------------------------------------------------- slow: real dvc in a copy
class Repo:
    """A git repository with this project's DVC setup and a tiny params.yaml (prepare takes about a second)."""

    def __init__(self, tmp: Path):
        self.path = tmp / "proj"
        shutil.copytree(ROOT / "paft", self.path / "paft", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"):
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, self.path / name)
        # (the stage's `paft` is the venv's, i.e. this project's code; the copy of paft/ is what DVC hashes)
        # every key prepare reads is in the file (DVC needs them there), plus keys it does not read
        write_params(self.path, {"seed": 0, "data": {"seed": 0, "eval_fraction": 0.1},
                                 "rec": {"dimensions": ["faithfulness", "coherence"], "sources": [], "scale_max": 5}})
        dirs = {d: tmp / d for d in ("home", "dvc-global", "dvc-system", "dvc-site")}
        for d in dirs.values():
            d.mkdir()
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(dirs["home"]),
                    "XDG_CONFIG_HOME": str(dirs["home"] / ".config"), "XDG_CACHE_HOME": str(dirs["home"] / ".cache"),
                    "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(dirs["dvc-global"]),
                    "DVC_SYSTEM_CONFIG_DIR": str(dirs["dvc-system"]), "DVC_SITE_CACHE_DIR": str(dirs["dvc-site"]),
                    "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
        self.git("init", "-q")
        self.git("config", "user.name", "test")
        self.git("config", "user.email", "test@example.com")
        self.commit("init")

    def sh(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=self.path, capture_output=True, text=True, env=self.env, timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def git(self, *args: str) -> str:
        return self.sh("git", *args).stdout

    def dvc(self, *args: str) -> str:
        """stdout and stderr of a dvc command that must succeed."""
        proc = self.sh(str(BIN / "dvc"), *args)
        return proc.stdout + proc.stderr

    def dvc_json(self, *args: str):
        return json.loads(self.sh(str(BIN / "dvc"), *args, "--json").stdout)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def lock(self) -> dict:
        return yaml.safe_load((self.path / "dvc.lock").read_text())["stages"]["prepare"]

    def out_hash(self) -> str:
        (out,) = self.lock()["outs"]
        assert out["path"] == "data/processed"
        return out["md5"]

    def data(self) -> dict[str, str]:
        """sha256 of every file of data/processed."""
        folder = self.path / "data/processed"
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path)


@pytest.mark.slow
def test_repro_runs_prepare_once_and_records_data_and_params_in_dvc_lock(repo):
    log = repo.dvc("repro")
    assert "Running stage 'prepare'" in log, log
    files = repo.data()
    assert {"sft.jsonl", "preference.jsonl", "rec.jsonl", "eval_tasks.jsonl", "summary.json"} <= set(files)
    stage = repo.lock()
    assert stage["cmd"] == "paft prepare --params params.yaml --out data/processed"
    (out,) = stage["outs"]
    assert out["path"] == "data/processed" and out["md5"].endswith(".dir") and out["nfiles"] == len(files)
    assert set(stage["params"]["params.yaml"]) == PREPARE_PARAMS
    assert stage["params"]["params.yaml"]["rec.dimensions"] == ["faithfulness", "coherence"]
    assert {d["path"] for d in stage["deps"]} >= {"paft/data", "paft/rec/schema.py"}
    assert "processed" not in repo.git("status", "--porcelain")  # git-ignored: DVC tracks it
    repo.commit("data")

    # bytecode beside the stage's code (written whenever paft runs) is no change of the paft/data dependency
    repo.sh(sys.executable, "-m", "compileall", "-q", "paft")
    assert (repo.path / "paft/data/__pycache__").is_dir()
    inode = (repo.path / "data/processed").stat().st_ino
    log = repo.dvc("repro")
    assert "Stage 'prepare' didn't change, skipping" in log and "Running stage" not in log, log
    assert (repo.path / "data/processed").stat().st_ino == inode and repo.data() == files
    assert repo.dvc_json("status") == {}

    # a change of the stage's code does rerun it
    with (repo.path / "paft/data/world.py").open("a") as f:
        f.write("\n# touched\n")
    assert repo.dvc_json("status") == {"prepare": [{"changed deps": {"paft/data": "modified"}}]}


@pytest.mark.slow
def test_only_the_params_prepare_reads_make_it_stale(repo):
    repo.dvc("repro", "--quiet")
    repo.commit("data")
    original = (repo.path / "params.yaml").read_text()
    reads = {"data.seed": 3, "data.eval_fraction": 0.5, "rec.dimensions": ["coherence"],
             "rec.sources": [{"builder": "wice", "path": "wice.jsonl"}]}
    ignores = {"seed": 3, "train.sft.max_steps": 7, "rec.max_steps": 9, "rec.scale_max": 7,
               "model.tiny.vocab_size": 300}
    for key, value in {**reads, **ignores}.items():
        params = yaml.safe_load(original)
        *parents, leaf = key.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = value
        (repo.path / "params.yaml").write_text(yaml.safe_dump(params))
        status = repo.dvc_json("status")
        if key in reads:
            section = "data" if key.startswith("data.") else key  # the stage depends on all of `data`
            assert status == {"prepare": [{"changed deps": {"params.yaml": {section: "modified"}}}]}, (key, status)
        else:
            assert status == {}, (key, status)


@pytest.mark.slow
def test_exp_run_set_param_reruns_prepare_only_for_its_params(repo):
    repo.dvc("repro", "--quiet")
    repo.commit("data")
    base = repo.out_hash()

    log = repo.dvc("exp", "run", "-S", "train.sft.max_steps=7")  # a key prepare does not read
    assert "Stage 'prepare' didn't change, skipping" in log and "Running stage" not in log, log
    assert repo.out_hash() == base
    repo.git("checkout", "-q", "--", "params.yaml", "dvc.lock")

    log = repo.dvc("exp", "run", "-S", "data.seed=1", "-n", "seed1")
    assert "Running stage 'prepare'" in log, log
    assert yaml.safe_load((repo.path / "params.yaml").read_text())["data"]["seed"] == 1  # applied to the workspace
    assert repo.out_hash() != base
    assert json.loads((repo.path / "data/processed/summary.json").read_text())["seed"] == 1

    assert repo.dvc_json("params", "diff")["params.yaml"] == {"data.seed": {"old": 0, "new": 1, "diff": 1}}
    rows = {row["rev"]: row for row in repo.dvc_json("exp", "show")}
    baseline = rows[repo.git("rev-parse", "HEAD").strip()]
    assert baseline["data"]["outs"]["data/processed"]["hash"] == base
    exps = {e["name"]: e["revs"][0]["data"] for e in baseline["experiments"]}
    assert "seed1" in exps and len(exps) == 2, exps  # and the max_steps one
    seed1 = exps["seed1"]
    assert seed1["params"]["params.yaml"]["data"]["data"]["seed"] == 1
    assert seed1["outs"]["data/processed"]["hash"] == repo.out_hash()
    other, = (e for name, e in exps.items() if name != "seed1")
    assert other["params"]["params.yaml"]["data"]["train"]["sft"]["max_steps"] == 7
    assert other["outs"]["data/processed"]["hash"] == base


@pytest.mark.slow
def test_push_and_pull_through_the_default_local_remote(repo, tmp_path):
    # the committed .dvc/config's relative url resolves inside the copy (under tmp_path), never the real folder
    name = repo.dvc("remote", "default").strip()
    url = repo.dvc("config", f"remote.{name}.url").strip()
    storage = (repo.path / ".dvc" / url).resolve()  # DVC resolves a relative url against .dvc/
    assert storage.parent == repo.path and storage.is_relative_to(tmp_path), url
    assert not storage.exists()

    repo.dvc("repro", "--quiet")
    files = repo.data()
    version = hash_dir(repo.path / "data/processed")  # the data version the flow logs to MLflow
    assert "pushed" in repo.dvc("push")
    for f in (repo.path / "data/processed").iterdir():  # each file sits in the remote under its md5
        md5 = hashlib.md5(f.read_bytes()).hexdigest()
        assert (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file(), f.name
    assert repo.dvc_json("status", "--cloud") == {}
    assert storage.name not in repo.git("status", "--porcelain")  # the remote folder is git-ignored
    repo.commit("data")

    shutil.rmtree(repo.path / ".dvc/cache")
    shutil.rmtree(repo.path / "data/processed")
    repo.dvc("pull")
    assert repo.data() == files and hash_dir(repo.path / "data/processed") == version
    assert repo.dvc_json("status") == {}
