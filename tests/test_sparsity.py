"""Sparsity of fine-tuning deltas: exact shares on constructed deltas, LoRA cases, plots, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paft.errors import PaftError
from paft.merge.deltas import load_deltas
from paft.train.sparsity import format_table, iter_deltas, sparsity_report

ROOT = Path(__file__).resolve().parents[1]
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
BIG = "model.layers.1.self_attn.o_proj.weight"  # base set to 2.0: rel threshold 2e-3 > eps_abs
SMALL = "model.layers.1.mlp.down_proj.weight"  # base set to 1e-3: rel threshold 1e-6 < eps_abs


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    sd = model.state_dict()
    with torch.no_grad():
        sd[BIG].fill_(2.0)
        sd[SMALL].fill_(1e-3)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    return path


def base_weights(base_dir):
    from safetensors.torch import load_file

    return load_file(str(base_dir / "model.safetensors"))


def full_copy(base_dir, path, edit):
    """A "fully fine-tuned" folder: the base weights with ``edit(weights)`` applied."""
    from safetensors.torch import save_file

    w = base_weights(base_dir)
    edit(w)
    path.mkdir(parents=True)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def adapter(base_dir, path, *, seed=0, random_b=False, **lora_kwargs):
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_lora_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    save_lora_adapter(model, path, seed, random_b, **lora_kwargs)
    return path


def set_first(t: torch.Tensor, k: int, value: float) -> None:
    """Add ``value`` to ``k`` entries of ``t`` spread over the tensor (every (numel // k)-th)."""
    flat = t.view(-1)
    idx = torch.arange(k) * (flat.numel() // k)
    flat[idx] += value


# ----------------------------------------------------------------------------- exact shares
def test_full_model_exact_shares(base_dir, tmp_path):
    def edit(w):
        set_first(w[Q0], 128, 0.5)  # 12.5% of 1024
        set_first(w[Q1], 256, 0.5)  # 25%

    ft = full_copy(base_dir, tmp_path / "ft", edit)
    rep = sparsity_report(base_dir, {"ft": ft}, tmp_path / "out")
    mods, o = rep["modules"]["ft"], rep["overall"]["ft"]
    total = sum(t.numel() for t in base_weights(base_dir).values())

    assert mods[Q0]["entries"] == 1024 and mods[Q0]["shape"] == [32, 32]
    assert mods[Q0]["share_abs"] == (1024 - 128) / 1024 == mods[Q0]["share_rel"]
    assert mods[Q1]["share_abs"] == (1024 - 256) / 1024 == mods[Q1]["share_rel"]
    assert mods[Q0]["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert mods[Q0]["l1"] == pytest.approx(128 * 0.5, rel=1e-5)
    assert mods[Q0]["l2"] == pytest.approx(0.5 * 128 ** 0.5, rel=1e-5)
    assert mods[Q0]["mean_abs"] == pytest.approx(128 * 0.5 / 1024, rel=1e-5)
    for name, m in mods.items():  # every other tensor is unchanged
        if name not in (Q0, Q1):
            assert m["share_abs"] == 1.0 and m["share_rel"] == 1.0 and m["l1"] == 0.0, name

    # overall: entry-weighted over every tensor of the full model (= the whole base)
    assert o["entries"] == total and o["coverage"] == 1.0 and o["tensors"] == len(mods)
    assert o["share_abs"] == (total - 384) / total == o["share_rel"]
    assert o["l1"] == pytest.approx(384 * 0.5, rel=1e-5)
    assert o["l2"] == pytest.approx(0.5 * 384 ** 0.5, rel=1e-5)
    assert o["max_abs"] == pytest.approx(0.5, abs=1e-6)

    written = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert written["overall"] == rep["overall"] and written["modules"]["ft"][Q0] == mods[Q0]
    assert written["eps_abs"] == 1e-5 and written["eps_rel"] == 1e-3
    assert written["inputs"]["ft"] == {"path": str(ft), "kind": "full"}


def test_skip_unchanged_measures_only_the_changed_tensors(base_dir, tmp_path):
    def edit(w):
        set_first(w[Q0], 128, 0.5)
        set_first(w[Q1], 256, 0.5)

    ft = full_copy(base_dir, tmp_path / "ft", edit)
    rep = sparsity_report(base_dir, {"ft": ft}, tmp_path / "out", skip_unchanged=True)
    o = rep["overall"]["ft"]
    assert set(rep["modules"]["ft"]) == {Q0, Q1} and o["tensors"] == 2
    assert o["unchanged_tensors"] == len(base_weights(base_dir)) - 2 and rep["skip_unchanged"] is True
    assert o["entries"] == 2048 and o["share_abs"] == (2048 - 384) / 2048
    assert o["coverage"] == pytest.approx(2048 / sum(t.numel() for t in base_weights(base_dir).values()))


def test_relative_threshold_uses_base_scale(base_dir, tmp_path):
    def edit(w):
        w[BIG] += 1e-3  # > eps_abs, but <= 1e-3 * mean|W| = 2e-3: "unchanged" relatively
        w[SMALL] += 5e-6  # <= eps_abs, but > 1e-3 * 1e-3 = 1e-6: "changed" relatively

    ft = full_copy(base_dir, tmp_path / "ft", edit)
    rep = sparsity_report(base_dir, {"ft": ft}, tmp_path / "out", eps_abs=1e-5, eps_rel=1e-3)
    big, small = rep["modules"]["ft"][BIG], rep["modules"]["ft"][SMALL]
    assert big["scale"] == pytest.approx(2.0) and small["scale"] == pytest.approx(1e-3)
    assert big["share_abs"] == 0.0 and big["share_rel"] == 1.0
    assert small["share_abs"] == 1.0 and small["share_rel"] == 0.0
    assert big["entries"] == 32 * 32 and small["entries"] == 32 * 64
    o = rep["overall"]["ft"]
    assert o["share_abs"] == (o["entries"] - big["entries"]) / o["entries"]
    assert o["share_rel"] == (o["entries"] - small["entries"]) / o["entries"]


# ----------------------------------------------------------------------------- LoRA
def test_lora_zero_b_is_fully_sparse_random_b_is_dense(base_dir, tmp_path):
    zero = adapter(base_dir, tmp_path / "zero")
    dense = adapter(base_dir, tmp_path / "dense", seed=1, random_b=True)
    rep = sparsity_report(base_dir, {"zero": zero, "dense": dense}, tmp_path / "out")
    z, d = rep["overall"]["zero"], rep["overall"]["dense"]
    linear_entries = 2 * (32 * 32 * 2 + 16 * 32 * 2 + 64 * 32 * 3)  # q,o + k,v + gate,up,down per layer
    assert z["tensors"] == d["tensors"] == 14
    assert z["entries"] == d["entries"] == linear_entries  # only the modules the adapter targets
    assert z["coverage"] == pytest.approx(linear_entries / rep["base_entries"])
    assert z["share_abs"] == 1.0 and z["share_rel"] == 1.0 and z["l1"] == 0.0 and z["max_abs"] == 0.0
    assert d["share_abs"] < 0.01 and d["share_rel"] < 0.01 and d["mean_abs"] > 1e-3
    assert rep["inputs"]["zero"]["kind"] == "lora"
    assert all(m["share_abs"] == 1.0 for m in rep["modules"]["zero"].values())

    table = format_table(rep)
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") - line.count("\\|") == 6 for line in lines)
    assert lines[2].startswith("| zero | ") and "100.00%" in lines[2]
    assert lines[3].startswith("| dense | ")


@pytest.mark.parametrize("kwargs", [
    {},
    {"modules_to_save": ["norm"]},
    {"target_modules": ["embed_tokens", "q_proj"]},
    {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "rank_pattern": {"v_proj": 2}},
])
def test_lazy_deltas_equal_load_deltas(base_dir, tmp_path, kwargs):
    ad = adapter(base_dir, tmp_path / "ad", seed=3, random_b=True, **kwargs)
    ref = load_deltas(base_dir, ad)
    got = dict(iter_deltas(base_dir, ad))
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert torch.allclose(got[name], t, atol=1e-7), name


def test_full_lazy_deltas_equal_load_deltas(base_dir, tmp_path):
    ft = full_copy(base_dir, tmp_path / "ft", lambda w: w[Q0].add_(torch.randn(w[Q0].shape)))
    ref = load_deltas(base_dir, ft)
    got = dict(iter_deltas(base_dir, ft))
    assert sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)


# ----------------------------------------------------------------------------- plots
def test_histograms_are_pngs_and_sampled(base_dir, tmp_path):
    zero = adapter(base_dir, tmp_path / "zero")
    dense = adapter(base_dir, tmp_path / "dense", seed=1, random_b=True)
    out = tmp_path / "out"
    rep = sparsity_report(base_dir, {"sft": dense, "align": zero}, out, hist_sample=1000)
    assert rep["files"]["hist"] == {"sft": str(out / "hist_sft.png"), "align": str(out / "hist_align.png")}
    assert sorted(p.name for p in out.iterdir()) == ["hist_align.png", "hist_all.png", "hist_sft.png", "sparsity.json"]
    for p in [*rep["files"]["hist"].values(), rep["files"]["hist_all"]]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]  # no temp folders left
    # the histogram data the PNGs plot: common bins; every (finite, in-range) sampled entry counted once
    written = json.loads((out / "sparsity.json").read_text())["histograms"]
    assert written == rep["histograms"] and list(written) == ["sft", "align"]
    for name, h in written.items():
        assert len(h["edges"]) == 101 and len(h["shares"]) == 100 and h["edges"] == written["sft"]["edges"]
        assert h["samples"] >= 1000 and sum(h["shares"]) == pytest.approx(1.0), name
        assert all(a < b for a, b in zip(h["edges"], h["edges"][1:])) and min(h["shares"]) >= 0
    assert written["align"]["shares"][0] == pytest.approx(1.0)  # LoRA with B = 0: all exact zeros, lowest bin


# ----------------------------------------------------------------------------- failures
def test_failures_write_nothing(base_dir, tmp_path):
    ft = full_copy(base_dir, tmp_path / "ft", lambda w: None)
    out = tmp_path / "sub" / "out"
    with pytest.raises(PaftError, match="missing.*does not exist"):
        sparsity_report(base_dir, {"a": ft, "b": tmp_path / "missing"}, out)
    with pytest.raises(PaftError, match="not usable in a file name"):
        sparsity_report(base_dir, {"a/b": ft}, out)
    with pytest.raises(PaftError, match="eps_abs"):
        sparsity_report(base_dir, {"a": ft}, out, eps_abs=-1)
    bad = full_copy(base_dir, tmp_path / "bad", lambda w: w.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(PaftError, match="'extra.weight'"):
        sparsity_report(base_dir, {"a": ft, "bad": bad}, out)
    assert not (tmp_path / "sub").exists()


# ----------------------------------------------------------------------------- CLI
def cli(*args, cwd):
    """Start ``python -m paft.cli sparsity ARGS``; returns the Popen (read it with ``communicate``)."""
    return subprocess.Popen([sys.executable, "-m", "paft.cli", "sparsity", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli(base_dir, tmp_path):
    zero = adapter(base_dir, tmp_path / "align")
    ft = full_copy(base_dir, tmp_path / "sft", lambda w: set_first(w[Q0], 128, 0.5))
    out = tmp_path / "report"
    ok = cli(base_dir, ft, zero, "--out", out, "--eps-abs", "1e-4", cwd=tmp_path)
    bad = cli(base_dir, ft, tmp_path / "nope", "--out", tmp_path / "never" / "x", cwd=tmp_path)  # concurrently

    stdout, stderr = ok.communicate(timeout=120)
    assert ok.returncode == 0, stderr
    assert "| sft | " in stdout and "| align | " in stdout and "100.00%" in stdout
    assert str(out) in stdout
    rep = json.loads((out / "sparsity.json").read_text())
    assert rep["eps_abs"] == 1e-4 and list(rep["inputs"]) == ["sft", "align"]
    assert (out / "hist_sft.png").is_file() and (out / "hist_align.png").is_file()

    stdout, stderr = bad.communicate(timeout=120)
    assert bad.returncode == 2 and stdout == ""
    assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ") and "nope" in stderr
    assert not (tmp_path / "never").exists()


def test_cli_names_in_process(base_dir, tmp_path, capsys):
    from paft.cli import main

    ft = full_copy(base_dir, tmp_path / "same", lambda w: None)
    other = full_copy(base_dir, tmp_path / "x" / "same", lambda w: None)
    assert main(["sparsity", str(base_dir), str(ft), str(other), "--names", "a", "b",
                 "--out", str(tmp_path / "named")]) == 0
    out = capsys.readouterr().out
    assert "| a | " in out and "| b | " in out and "Outputs: " in out
    # the default names (folder names) collide; a wrong number of names
    assert main(["sparsity", str(base_dir), str(ft), str(other), "--out", str(tmp_path / "n2")]) == 2
    assert main(["sparsity", str(base_dir), str(ft), "--names", "a", "b", "--out", str(tmp_path / "n3")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "unique" in err[0] and "2 names for 1" in err[1]
    assert not (tmp_path / "n2").exists() and not (tmp_path / "n3").exists()
