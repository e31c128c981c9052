import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paft.config import DIMENSIONS, load_params
from paft.data import world
from paft.data.prepare import prepare
from paft.errors import DataError
from paft.io import hash_dir, read_jsonl
from paft.rec.cite import verify
from paft.rec.schema import Judgment
from tests.conftest import ROOT, write_params


def test_synthetic_world_is_deterministic_and_held_out():
    a = world.generate(3, 40, 20, 40, 12, list(DIMENSIONS))
    b = world.generate(3, 40, 20, 40, 12, list(DIMENSIONS))
    c = world.generate(4, 40, 20, 40, 12, list(DIMENSIONS))
    assert a == b and a != c
    train_prompts = {r["prompt"] for r in a["sft"]} | {r["prompt"] for r in a["preference"]}
    assert not train_prompts & {r["prompt"] for r in a["eval_tasks"]}
    assert not train_prompts & {r["prompt"] for r in a["eval_preference"]}
    # the validation set (the merge search selects on it) is apart from training and from the evaluation
    val = {r["prompt"] for r in a["val_tasks"] + a["val_preference"]}
    assert len(a["val_tasks"]) == len(a["val_preference"]) == 12 and a["val_preference"][0]["chosen"].startswith(world.STYLE_PREFIX)
    assert not val & train_prompts and not val & {r["prompt"] for r in a["eval_tasks"] + a["eval_preference"]}
    # the pretraining corpus never shows the instructed answer form that SFT teaches
    assert not any("Answer:" in r["text"] for r in a["corpus"] if not r["text"].startswith("{"))


def test_skill_and_style_are_separate_signals():
    """SFT targets carry the answer; preference pairs differ only in style, both with the same correct answer."""
    d = world.generate(0, 20, 20, 8, 8, list(DIMENSIONS))
    for r in d["sft"]:
        assert r["completion"].startswith("Answer: ") and not r["completion"].startswith(world.STYLE_PREFIX)
    for r in d["preference"]:
        assert r["chosen"].startswith(world.STYLE_PREFIX)
        assert not r["rejected"].startswith(world.STYLE_PREFIX)
        assert r["chosen"].split("Answer: ")[1] == r["rejected"].split("Answer: ")[1]


def test_rec_examples_cover_dimensions_and_cite_verbatim():
    d = world.generate(1, 8, 8, 80, 8, list(DIMENSIONS))
    points = [r for r in d["rec"] if r.get("task", "pointwise") == "pointwise"]
    pairs = [r for r in d["rec"] if r.get("task") == "pairwise"]
    assert {r["dimension"] for r in points} == set(DIMENSIONS)
    assert {r["rating"] for r in points} >= {1, 5}
    assert len(pairs) == 20 and {r["winner"] for r in pairs} == {"A", "B"}
    injected = [r for r in points if any(i in r["response"] for i in world.TRAIN_INJECTIONS)]
    assert injected and all(r["rating"] <= 2 and r["injected"] for r in injected)  # the instruction changes nothing
    for r in points + pairs:
        sources = [r["context"], r["instruction"], r.get("response", ""), r.get("response_a", ""), r.get("response_b", "")]
        assert all(c["verified"] for c in verify(r["citations"], sources=sources, sentences=[], mode="span")), r
    for r in points:
        j = Judgment.model_validate({k: r[k] for k in ("dimension", "rating", "explanation", "citations")})
        assert j.explanation.startswith(" ".join(c.statement for c in j.citations))


def test_prepare_writes_every_split_and_versions_by_content(tmp_path):
    params = load_params(write_params(tmp_path))
    out = prepare(params)
    folder = tmp_path / "data" / "processed"
    assert out["path"] == str(folder)
    for name in ("sft", "preference", "rec", "eval_tasks", "eval_preference", "eval_rec", "val_tasks", "val_preference",
                 "corpus"):
        assert (folder / f"{name}.jsonl").is_file()
        assert out["counts"][name] == len(read_jsonl(folder / f"{name}.jsonl"))
    assert json.loads((folder / "summary.json").read_text())["counts"] == out["counts"]
    assert out["data_version"] == hash_dir(folder)
    again = prepare(params)
    assert again["data_version"] == out["data_version"]
    other = prepare(load_params(write_params(tmp_path / "b", {"data": {"seed": 9}})))
    assert other["data_version"] != out["data_version"]


def test_malformed_jsonl_source_stops_prepare_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n')
    params = load_params(write_params(tmp_path, {"data": {"sources": [
        {"kind": "synthetic", "n_sft": 8, "n_preference": 8, "n_rec": 8, "n_eval": 4},
        {"kind": "local", "path": str(bad), "format": "sft_jsonl"},
    ]}}))
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        prepare(params)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))


def test_prepare_cli_error_is_one_line_and_keeps_previous_output(tmp_path):
    good = write_params(tmp_path)
    subprocess.run([sys.executable, "-m", "paft.cli", "prepare", "--params", str(good)], check=True,
                   capture_output=True, timeout=120)
    before = hash_dir(tmp_path / "data" / "processed")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    proc = subprocess.run(
        [sys.executable, "-m", "paft.cli", "prepare", "--params", str(good),
         f"data.sources=[{{kind: local, path: {bad}, format: sft_jsonl}}]"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}:1: malformed JSON (Expecting value at column 1)"
    assert hash_dir(tmp_path / "data" / "processed") == before
    assert not list((tmp_path / "data").glob("processed.tmp-*"))


def test_real_sources_feed_sft_and_preference_with_held_out_share(tmp_path, shared_data):
    params = load_params(write_params(tmp_path, {"data": {"eval_fraction": 0.2, "sources": [
        {"kind": "synthetic", "n_sft": 8, "n_preference": 8, "n_rec": 8, "n_eval": 4},
        {"kind": "local", "path": str(shared_data / "sft/alpaca_eval_llama3_70b_outputs.json"), "format": "alpaca_eval_outputs", "limit": 50},
        {"kind": "local", "path": str(shared_data / "preference/hh_rlhf_harmless_base_test.jsonl.gz"), "format": "hh_rlhf", "limit": 50},
        {"kind": "local", "path": str(shared_data / "preference/alpaca_eval_gpt4_vs_davinci003_annotations.json"), "format": "alpaca_eval_annotations", "limit": 50},
    ]}}))
    out = prepare(params)
    assert out["counts"]["sft"] == 8 + 30 and out["counts"]["eval_sft"] == out["counts"]["val_sft"] == 10
    assert out["counts"]["preference"] == 8 + 30 + 30 and out["counts"]["eval_preference"] == 4 + 10 + 10
    assert out["counts"]["val_preference"] == 4 + 10 + 10
    folder = tmp_path / "data/processed"
    prompts = {n: {r["prompt"] for r in read_jsonl(folder / f"{n}.jsonl")} for n in ("sft", "eval_sft", "val_sft")}
    assert not prompts["val_sft"] & (prompts["sft"] | prompts["eval_sft"]) and not prompts["eval_sft"] & prompts["sft"]
    summary = json.loads((tmp_path / "data/processed/summary.json").read_text())
    assert any(v.get("role") == "preference" for v in summary["sources"].values())


def test_real_rec_sources_are_mixed_by_weight_and_held_out_per_source(tmp_path, shared_data):
    params = load_params(write_params(tmp_path, {
        "data": {"eval_fraction": 0.25, "sources": [{"kind": "synthetic", "n_sft": 8, "n_preference": 8, "n_rec": 8, "n_eval": 4}]},
        "rec": {"sources": [
            {"builder": "wice", "path": str(shared_data / "citations/wice_claim_dev.jsonl"), "limit": 40, "weight": 2.0},
            {"builder": "pandalm", "path": str(shared_data / "judge_pairwise/pandalm_test.json"), "limit": 40, "weight": 0.5},
        ]}}))
    out = prepare(params)
    d = tmp_path / "data/processed"
    rec = read_jsonl(d / "rec.jsonl")
    held_wice, held_panda = read_jsonl(d / "eval_rec_wice.jsonl"), read_jsonl(d / "eval_rec_pandalm.jsonl")
    assert 0 < len(held_wice) < 40 and 0 < len(held_panda) < 40
    by_source = {s: sum(r["source"] == s for r in rec) for s in ("synthetic", "wice", "pandalm")}
    assert by_source["synthetic"] == len(world.generate(0, 8, 8, 8, 4, list(DIMENSIONS))["rec"])  # weight 1
    assert by_source["wice"] == 2 * (40 - len(held_wice))  # weight 2: every training row twice
    assert by_source["pandalm"] == int(0.5 * (40 - len(held_panda)) + 0.5)  # a seeded half, rounded half up
    held = {(r["instruction"], r["context"]) for r in held_wice}
    assert not held & {(r["instruction"], r["context"]) for r in rec if r["source"] == "wice"}
    assert out["counts"]["eval_rec_wice"] == len(held_wice)


@pytest.mark.slow
def test_dvc_repro_prepare_in_a_fresh_clone(tmp_path):
    """`dvc repro prepare` works in a fresh clone of the repository (its committed files only)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # the working tree may hold uncommitted changes under test: copy its files (not the ignored ones) over
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    for name in ("dvc.yaml", "params.yaml", ".dvc/config"):
        assert (clone / name).is_file(), name
    (clone / "dvc.lock").unlink(missing_ok=True)
    bindir = Path(sys.executable).parent  # the venv's bin: paft and dvc are there
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run([f"{bindir}/dvc", "repro", "prepare"], cwd=clone, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (clone / "data/processed/sft.jsonl").is_file()
    assert "data/processed" in (clone / "dvc.lock").read_text()


def test_concurrent_prepares_of_the_same_data_leave_one_folder_untouched(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    params = load_params(write_params(tmp_path))
    with ThreadPoolExecutor(2) as pool:  # two flow runs preparing at once into one data_dir
        a, b = pool.map(lambda _: prepare(params), range(2))
    assert a["data_version"] == b["data_version"]
    out = tmp_path / "data/processed"
    inode = out.stat().st_ino
    assert prepare(params)["data_version"] == a["data_version"] and out.stat().st_ino == inode  # not swapped
    assert not [p for p in tmp_path.glob("data/processed.*")]  # no temporary or old copies left
    other = load_params(write_params(tmp_path, {"data": {"seed": 5}}))
    assert prepare(other)["data_version"] != a["data_version"] and out.stat().st_ino != inode  # new data replaces
