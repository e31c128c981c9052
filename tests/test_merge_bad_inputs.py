"""Bad merge inputs: each gives a one-line error naming the input (and tensor), a non-zero exit, no output.

Inputs are tiny full models derived from the base (its weights plus noise, edited with safetensors) or
copies of the LoRA adapters of tests/test_merge.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from paft.cli import main
from paft.errors import PaftError
from paft.merge import MergeInput, merge_models
from tests.test_merge import adapters, base_dir, leftovers, tiny_config, weights_of  # noqa: F401 (fixtures)

WEIGHTS = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"  # (32, 32)
GATE = "model.layers.0.mlp.gate_proj.weight"  # (64, 32)
EMB = "model.embed_tokens.weight"  # (64, 32), tied


def full_model(base, path, edit=None, **config):
    """A full fine-tuned model: the base's weights plus small noise, then ``edit(weights)``; config keys set."""
    path.mkdir()
    cfg = json.loads((base / "config.json").read_text()) | config
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    w = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(base / WEIGHTS).items()}
    if edit:
        edit(w)
    save_file(w, path / WEIGHTS, metadata={"format": "pt"})
    return path


def from_config(path, **overrides):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config(**overrides)).save_pretrained(path)
    return path


def put(name, value):
    def edit(w):
        w[name][0, 0] = value
    return edit


def copy_adapter(adapters, path, recorded=None):
    shutil.copytree(adapters["sft"][0], path)
    if recorded is not None:
        cfg_path = path / "adapter_config.json"
        cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"base_model_name_or_path": str(recorded)}))
    return path


def fails(base, inputs, out, *parts, method="task_arithmetic", **kwargs) -> str:
    """The merge raises a one-line PaftError containing each of ``parts`` and leaves no output behind."""
    with pytest.raises(PaftError) as e:
        merge_models(base, inputs, method, out, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    assert leftovers(out) == []
    return msg


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- architecture and shapes
@pytest.mark.parametrize("key,value", [("num_hidden_layers", 3), ("hidden_size", 48)])
def test_architecture_mismatch(base_dir, tmp_path, key, value):
    other = from_config(tmp_path / "other", **{key: value})
    fails(base_dir, [MergeInput(other)], tmp_path / "merged", other, key, "another architecture")


@pytest.mark.parametrize("shape,allow", [
    ((64, 16), False),
    ((48, 32), False),
    ((48, 32), True),  # the option fits only the vocabulary's rows
], ids=["columns", "rows", "rows-allow-vocab"])
def test_shape_mismatch_with_same_config(base_dir, tmp_path, shape, allow):
    bad = full_model(base_dir, tmp_path / "reshaped", lambda w: w.__setitem__(GATE, torch.randn(shape)))
    fails(base_dir, [MergeInput(bad)], tmp_path / "merged", bad, GATE, f"shape {shape}", "base has (64, 32)",
          allow_vocab_mismatch=allow)


def test_vocab_mismatch_refused_unless_allowed(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    big = from_config(tmp_path / "big", vocab_size=80)
    out = tmp_path / "merged"
    fails(base_dir, [MergeInput(big)], out, big, "vocab_size is 80", "64", "allow_vocab_mismatch")
    merge_models(base_dir, [MergeInput(big)], "task_arithmetic", out, allow_vocab_mismatch=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 64
    got, base, tuned = (weights_of(p)[EMB] for p in (out, base_dir, big))
    assert got.shape == base.shape == (64, 32) and tuned.shape == (80, 32)
    assert torch.allclose(got, base + (tuned[:64] - base), atol=1e-6)  # the shared rows, merged


def test_tensor_missing(base_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    part = full_model(base_dir, tmp_path / "partial", lambda w: w.pop(name))
    fails(base_dir, [MergeInput(part)], tmp_path / "merged", part, name, "missing")


# ----------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("method,density", [
    ("ties", 1.0), ("ties", 0.5), ("task_arithmetic", 1.0), ("dare_ties", 1.0),
    ("dare_ties", 0.5)])
def test_non_finite_input(base_dir, tmp_path, method, density, value):
    good = full_model(base_dir, tmp_path / "good")
    bad = full_model(base_dir, tmp_path / "bad", put(Q, value))
    msg = fails(base_dir, [MergeInput(good, density=density), MergeInput(bad, density=density)],
                tmp_path / "merged", bad, Q, "non-finite", method=method)
    assert not msg.startswith(f"{good}:")


@pytest.mark.parametrize("method,kind", [
    *((m, kind) for m in ("ties", "task_arithmetic", "dare_ties") for kind in ("full", "lora"))])
def test_non_finite_base(base_dir, adapters, tmp_path, method, kind):
    inp = full_model(base_dir, tmp_path / "tuned") if kind == "full" else adapters["sft"][0]
    nan_base = tmp_path / "nan_base"
    shutil.copytree(base_dir, nan_base)
    w = load_file(nan_base / WEIGHTS)
    put(Q, math.nan)(w)
    save_file(w, nan_base / WEIGHTS, metadata={"format": "pt"})
    fails(nan_base, [MergeInput(inp)], tmp_path / "merged", f"{nan_base}: tensor {Q!r}", "non-finite",
          method=method, ignore_adapter_base=True)


# ----------------------------------------------------------------------------- LoRA adapter's base
def test_adapter_trained_on_another_base(base_dir, adapters, tmp_path):
    other = from_config(tmp_path / "other", hidden_size=48)
    out = tmp_path / "merged"
    for i, recorded in enumerate(["someone/other-model", other]):
        ad = copy_adapter(adapters, tmp_path / f"ad{i}", recorded)
        fails(base_dir, [MergeInput(ad)], out, ad, f"trained on base {str(recorded)!r}", "ignore_adapter_base")
    merge_models(base_dir, [MergeInput(ad)], "task_arithmetic", out, ignore_adapter_base=True)  # overridden
    assert (out / WEIGHTS).is_file()
    copy = tmp_path / "base_copy"  # the same base in another folder: accepted
    shutil.copytree(base_dir, copy)
    merge_models(base_dir, [MergeInput(copy_adapter(adapters, tmp_path / "ad_copy", copy))], "ties", tmp_path / "m2")
    assert (tmp_path / "m2" / WEIGHTS).is_file()


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_density_outside_unit_interval(base_dir, adapters, tmp_path, density):
    ad = adapters["sft"][0]
    fails(base_dir, [MergeInput(ad, density=density)], tmp_path / "merged", ad, "density must be in (0, 1]",
          method="ties")


@pytest.mark.parametrize("weight", [math.inf, -math.inf, math.nan])
def test_non_finite_weight(base_dir, adapters, tmp_path, weight):
    ad = adapters["sft"][0]
    fails(base_dir, [MergeInput(ad, weight=weight)], tmp_path / "merged", ad, "weight must be finite")


def test_unknown_method(base_dir, adapters, tmp_path):
    fails(base_dir, [MergeInput(adapters["sft"][0])], tmp_path / "merged", "'bogus'", "known methods:",
          "task_arithmetic", "ties", method="bogus")


# ----------------------------------------------------------------------------- corrupted safetensors
def truncate(f):
    f.write_bytes(f.read_bytes()[:-16])


def garble_header(f):
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"\xff\xfe{garbage" * 4 + data[8 + 40:])


@pytest.mark.parametrize("where", ["input-truncated", "input-garbage-header", "base-truncated", "adapter-truncated"])
def test_corrupted_safetensors(base_dir, adapters, tmp_path, where):
    base, inp = base_dir, None
    if where.startswith("input"):
        inp = full_model(base_dir, tmp_path / "tuned")
        bad = inp / WEIGHTS
    elif where.startswith("base"):
        base = tmp_path / "base_copy"
        shutil.copytree(base_dir, base)
        inp, bad = adapters["sft"][0], base / WEIGHTS
    else:
        inp = copy_adapter(adapters, tmp_path / "ad")
        bad = inp / "adapter_model.safetensors"
    (garble_header if "garbage" in where else truncate)(bad)
    fails(base, [MergeInput(inp)], tmp_path / "merged", f"{bad}: corrupted safetensors")


# ----------------------------------------------------------------------------- earlier output, CLI
def test_failed_merge_leaves_earlier_output_untouched(base_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_models(base_dir, [MergeInput(adapters["sft"][0])], "ties", out)
    before = snapshot(out)
    inf = full_model(base_dir, tmp_path / "inf", put(Q, math.inf))  # fails while writing
    broken = full_model(base_dir, tmp_path / "broken")  # fails before
    truncate(broken / WEIGHTS)
    for bad in (inf, broken):
        with pytest.raises(PaftError, match=str(bad)):
            merge_models(base_dir, [MergeInput(bad)], "task_arithmetic", out)
        assert leftovers(out) == ["merged"] and snapshot(out) == before


def cli_case(case, base_dir, adapters, tmp_path):
    """(input folder, extra flags, text the error names) of a bad merge from the command line."""
    if case == "architecture":
        return from_config(tmp_path / "deep", num_hidden_layers=3), [], "num_hidden_layers"
    if case == "vocab":
        return from_config(tmp_path / "big", vocab_size=80), [], "vocab_size"
    if case == "missing":
        return full_model(base_dir, tmp_path / "partial", lambda w: w.pop(Q)), [], Q
    if case == "non-finite":
        return full_model(base_dir, tmp_path / "nan", put(Q, math.nan)), ["--method", "task_arithmetic"], Q
    if case == "adapter-base":
        return copy_adapter(adapters, tmp_path / "ad", "someone/other-model"), [], "someone/other-model"
    if case == "corrupted":
        inp = full_model(base_dir, tmp_path / "tuned")
        truncate(inp / WEIGHTS)
        return inp, [], "corrupted safetensors"
    return adapters["sft"][0], ["--method", "bogus"], "unknown merge method 'bogus'"


@pytest.mark.parametrize("case", ["architecture", "vocab", "missing", "non-finite", "adapter-base", "corrupted",
                                  "method"])
def test_cli_one_line_error_nonzero_exit_no_output(base_dir, adapters, tmp_path, capsys, case):
    inp, flags, named = cli_case(case, base_dir, adapters, tmp_path)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(base_dir), str(inp), "--out", str(out), *flags]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    if case != "method":
        assert str(inp) in err, err
    assert leftovers(out) == []
