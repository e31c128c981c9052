"""A merged model as a LoRA adapter (paft.merge.adapter.extract_lora): exactness through peft, Eckart-Young
optimality, what the adapter cannot carry, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from paft.errors import PaftError
from paft.merge import adapter
from paft.merge.adapter import extract_lora
from paft.merge.deltas import lora_deltas
from tests.conftest import save_lora_adapter
from tests.test_merge import tiny_config

LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])
EMB, NORM = "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"
Q0, Q1, DOWN1 = (f"model.layers.{i}.{m}.weight" for i, m in ((0, "self_attn.q_proj"), (1, "self_attn.q_proj"),
                                                             (1, "mlp.down_proj")))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(path)
    return path


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def save(tensors: dict[str, torch.Tensor], path):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def is_linear(name: str, w: torch.Tensor) -> bool:
    return w.ndim == 2 and "embed_tokens" not in name


def rank1(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g) * 0.05


def energy(t: torch.Tensor) -> float:
    return float(t.double().square().sum())


# ----------------------------------------------------------------------------- exact through peft
def test_low_rank_delta_round_trips_through_peft(base_dir, tmp_path):
    from peft import LoraConfig, PeftModel

    merged = save_lora_adapter(load(base_dir), tmp_path / "lora", seed=1).merge_and_unload().eval()  # r 4, all-linear
    merged.save_pretrained(tmp_path / "merged")
    want = merged.state_dict()
    with torch.no_grad():
        want_logits = merged(IDS).logits
        assert not torch.allclose(load(base_dir)(IDS).logits, want_logits, atol=1e-3)
    for alpha in (None, 16):
        out = tmp_path / f"adapter-{alpha}"
        s = extract_lora(base_dir, tmp_path / "merged", out, 4, alpha=alpha)
        assert (s["rank"], s["lora_alpha"], s["modules"], s["unchanged"], s["dropped"]) == (4, alpha or 4, 14, 0, [])
        assert s["target_modules"] == LINEAR and s["dtype"] == "float32"
        assert s["rel_error_max"] < 1e-5 and s["energy_kept"] == pytest.approx(1) and s["energy_dropped"] == 0
        cfg = LoraConfig.from_pretrained(str(out))
        assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)) == (4, alpha or 4, LINEAR)
        assert cfg.base_model_name_or_path == str(base_dir) and cfg.peft_type == "LORA" and not cfg.use_dora
        got = PeftModel.from_pretrained(load(base_dir), str(out)).merge_and_unload().eval()
        for name, w in got.state_dict().items():
            torch.testing.assert_close(w, want[name], atol=1e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(got(IDS).logits, want_logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- optimal truncation
def noisy_merged(base_dir, path, seed: int = 3):
    base = weights(base_dir)
    g = torch.Generator().manual_seed(seed)
    merged = {n: w + 0.02 * torch.randn(w.shape, generator=g) if is_linear(n, w) else w for n, w in base.items()}
    return base, merged, save(merged, path)


def test_full_rank_delta_error_is_the_eckart_young_tail(base_dir, tmp_path):
    base, merged, merged_dir = noisy_merged(base_dir, tmp_path / "merged")
    linear = sorted(n for n, w in base.items() if is_linear(n, w))
    mean_error = {}
    for rank in (2, 8, 40):  # 40 > min(out, in) of every module: exact, factors zero-padded
        out = tmp_path / f"r{rank}"
        s = extract_lora(base_dir, merged_dir, out, rank)
        got = lora_deltas(out)  # scale * B @ A per module, read back as a peft adapter
        assert sorted(got) == linear and s["modules"] == len(linear)
        tails = total = 0.0
        for name in linear:
            d = (merged[name] - base[name]).double()
            tail = float(torch.linalg.svdvals(d)[rank:].square().sum())
            err = float(torch.linalg.matrix_norm(d - got[name].double())) ** 2
            assert err == pytest.approx(tail, rel=1e-3, abs=1e-9 * energy(d)), name
            tails, total = tails + tail, total + energy(d)
        assert s["energy_truncated"] == pytest.approx(tails / total, rel=1e-3, abs=1e-7)
        assert s["energy_kept"] + s["energy_truncated"] == pytest.approx(1) and s["energy_dropped"] == 0
        mean_error[rank] = s["rel_error_mean"]
    assert mean_error[2] > mean_error[8] > 0.1 > 1e-5 > mean_error[40]
    assert load_file(str(tmp_path / "r40" / "adapter_model.safetensors"))[
        f"base_model.model.{Q0.removesuffix('.weight')}.lora_A.weight"].shape == (40, 32)


def test_randomized_svd_for_large_matrices(base_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "EXACT_SVD_MAX", 8)  # every module takes the svd_lowrank path
    base, merged, merged_dir = noisy_merged(base_dir, tmp_path / "merged")
    s = extract_lora(base_dir, merged_dir, tmp_path / "out", 2)
    got = lora_deltas(tmp_path / "out")
    for name, d in got.items():
        true = (merged[name] - base[name]).double()
        tail = float(torch.linalg.svdvals(true)[2:].square().sum()) ** 0.5
        err = float(torch.linalg.matrix_norm(true - d.double()))
        assert tail * (1 - 1e-5) <= err <= tail * 1.05, name  # near-optimal on a flat (noise) spectrum
    assert s["modules"] == 14
    # and exact on a delta of rank <= r
    low = dict(base) | {Q0: base[Q0] + rank1(base[Q0].shape, 1), DOWN1: base[DOWN1] + rank1(base[DOWN1].shape, 2)}
    s = extract_lora(base_dir, save(low, tmp_path / "low"), tmp_path / "out-low", 2)
    assert s["modules"] == 2 and s["rel_error_max"] < 1e-5


# ----------------------------------------------------------------------------- what the adapter cannot carry
def test_embeddings_norms_and_unselected_modules_are_dropped(base_dir, tmp_path):
    base = weights(base_dir)
    deltas = {EMB: 0.01 * torch.randn(base[EMB].shape), NORM: torch.full(base[NORM].shape, 0.1),
              Q0: rank1(base[Q0].shape, 1), DOWN1: rank1(base[DOWN1].shape, 2)}
    merged_dir = save({n: w + deltas[n] if n in deltas else w for n, w in base.items()}, tmp_path / "merged")
    e = {n: energy(d) for n, d in deltas.items()}
    total = sum(e.values())

    s = extract_lora(base_dir, merged_dir, tmp_path / "all", 2)
    assert s["dropped"] == sorted([EMB, NORM]) and s["target_modules"] == ["down_proj", "q_proj"]
    assert s["modules"] == 2 and s["unchanged"] == 12
    assert s["energy_dropped"] == pytest.approx((e[EMB] + e[NORM]) / total, rel=1e-5)
    assert s["energy_kept"] == pytest.approx((e[Q0] + e[DOWN1]) / total, rel=1e-5)
    assert s["energy_truncated"] == pytest.approx(0, abs=1e-9)

    s = extract_lora(base_dir, merged_dir, tmp_path / "q", 2, modules=["q_proj"])
    assert s["dropped"] == sorted([EMB, NORM, DOWN1]) and s["target_modules"] == ["q_proj"]
    assert (s["modules"], s["unchanged"]) == (1, 1)
    assert s["energy_dropped"] == pytest.approx((total - e[Q0]) / total, rel=1e-5)
    assert sorted(lora_deltas(tmp_path / "q")) == [Q0]

    only_dropped = save({n: w + deltas[n] if n in (EMB, NORM) else w for n, w in base.items()}, tmp_path / "emb")
    with pytest.raises(PaftError, match=f"nothing to extract.*{EMB}"):
        extract_lora(base_dir, only_dropped, tmp_path / "none", 2)


def test_half_precision_base_stores_half_factors(base_dir, tmp_path):
    base = {n: w.to(torch.bfloat16) for n, w in weights(base_dir).items()}
    base16 = save(base, tmp_path / "base16")
    merged = dict(base) | {Q0: (base[Q0].float() + rank1(base[Q0].shape, 1)).to(torch.bfloat16)}
    s = extract_lora(base16, save(merged, tmp_path / "merged"), tmp_path / "out", 4)
    assert s["dtype"] == "bfloat16" and s["modules"] == 1
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    assert s["rel_error_max"] < 0.02  # bf16 rounding of the factors


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_and_leave_no_output(base_dir, tmp_path):
    base = weights(base_dir)
    merged_dir = save(dict(base) | {Q0: base[Q0] + rank1(base[Q0].shape, 1)}, tmp_path / "merged")
    for rank in (0, -1, 2.5, True):
        with pytest.raises(PaftError, match="rank"):
            extract_lora(base_dir, merged_dir, tmp_path / "out", rank)
    with pytest.raises(PaftError, match="alpha"):
        extract_lora(base_dir, merged_dir, tmp_path / "out", 2, alpha=0)
    with pytest.raises(PaftError, match="nothing to extract"):
        extract_lora(base_dir, base_dir, tmp_path / "out", 2)
    with pytest.raises(PaftError, match="nothing to extract"):
        extract_lora(base_dir, merged_dir, tmp_path / "out", 2, modules=["v_proj"])
    missing = save({n: w for n, w in base.items() if n != DOWN1}, tmp_path / "missing")
    with pytest.raises(PaftError, match=f"missing: no tensor '{DOWN1}'"):
        extract_lora(base_dir, missing, tmp_path / "out", 2)
    reshaped = save(dict(base) | {Q0: torch.zeros(16, 32)}, tmp_path / "reshaped")
    with pytest.raises(PaftError, match=rf"reshaped: tensor '{Q0}' has shape \(16, 32\), base has \(32, 32\)"):
        extract_lora(base_dir, reshaped, tmp_path / "out", 2)
    with pytest.raises(PaftError, match="no model.safetensors"):
        extract_lora(base_dir, tmp_path / "nowhere", tmp_path / "out", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "missing", "reshaped"]  # no out, no temp folder
    # an earlier adapter in out_dir survives a failed extraction untouched
    extract_lora(base_dir, merged_dir, tmp_path / "out", 2)
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(PaftError):
        extract_lora(base_dir, base_dir, tmp_path / "out", 2)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "missing", "out", "reshaped"]
