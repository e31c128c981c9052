"""Merge engine: methods against independent reference implementations, LoRA deltas against peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paft.errors import PaftError
from paft.merge import METHODS, MergeInput, full_deltas, get_method, lora_deltas, merge_models, merge_tensor
from paft.merge.methods import magnitude

# ----------------------------------------------------------------------------- independent references
# Plain Python / numpy, entry by entry, written from the method descriptions (TIES paper + mergekit's
# generalized task arithmetic) rather than from paft.merge.methods.


def ref_trim(d: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return d.copy()
    flat = d.ravel()
    k = int(density * flat.size)
    order = sorted(range(flat.size), key=lambda j: -abs(flat[j]))
    out = np.zeros_like(flat)
    for j in order[:k]:
        out[j] = flat[j]
    return out.reshape(d.shape)


def ref_ties(base, deltas, weights, densities, lam=1.0, normalize=True):
    trimmed = [ref_trim(np.asarray(d, dtype=np.float64), rho).ravel() for d, rho in zip(deltas, densities)]
    out = np.asarray(base, dtype=np.float64).ravel().copy()
    for j in range(out.size):
        vals = [w * t[j] for w, t in zip(weights, trimmed)]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        num = den = 0.0
        for v, w in zip(vals, weights):
            if v != 0 and np.sign(v) == elected:
                num += v
                den += w
        out[j] += lam * (num / den if normalize and den != 0 else num)
    return out.reshape(np.shape(base))


def ref_task_arithmetic(base, deltas, weights, lam=1.0):
    out = np.asarray(base, dtype=np.float64).copy()
    for w, d in zip(weights, deltas):
        out = out + lam * w * np.asarray(d, dtype=np.float64)
    return out


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ----------------------------------------------------------------------------- methods on small tensors
def test_registry_has_the_methods():
    assert {"linear", "task_arithmetic", "ties"} <= set(METHODS)
    assert get_method("ties").default_normalize and not get_method("task_arithmetic").default_normalize


def test_ties_sign_conflicts_by_hand():
    base = [10.0, 10.0, 10.0, 10.0]
    d1, d2 = [1.0, -2.0, 0.5, 3.0], [-0.5, -1.0, 2.0, -4.0]
    # density 1: signs elected by the summed mass; agreeing entries averaged over their weights
    got = merge_tensor("ties", t(base), [t(d1), t(d2)], [1.0, 1.0], [1.0, 1.0])
    assert torch.allclose(got, t([11.0, 8.5, 11.25, 6.0]))
    # density 0.5 keeps 2 of 4 per delta: d1 -> [0,-2,0,3], d2 -> [0,0,2,-4]; with w2 = 0.5 entry 3 elects +
    got = merge_tensor("ties", t(base), [t(d1), t(d2)], [1.0, 0.5], [0.5, 0.5])
    assert torch.allclose(got, t([10.0, 8.0, 12.0, 13.0]))
    # a zero total elects "+" (mergekit: sum >= 0)
    got = merge_tensor("ties", t([0.0]), [t([1.0]), t([-1.0])], [1.0, 1.0])
    assert torch.allclose(got, t([1.0]))
    # without normalize: plain sum of the agreeing weighted entries, times lambda
    got = merge_tensor("ties", t(base), [t(d1), t(d2)], [1.0, 1.0], normalize=False, lambda_=0.5)
    assert torch.allclose(got, t([10.5, 8.5, 11.25, 8.0]))


@pytest.mark.parametrize("lam,normalize", [(1.0, True), (0.7, True), (1.3, False)])
def test_ties_matches_reference_random(lam, normalize):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 7, generator=g)
    deltas = [torch.randn(6, 7, generator=g) for _ in range(3)]
    weights, densities = [1.0, 0.6, 1.7], [0.5, 0.3, 1.0]
    got = merge_tensor("ties", base, deltas, weights, densities, lambda_=lam, normalize=normalize)
    want = ref_ties(base.numpy(), [d.numpy() for d in deltas], weights, densities, lam, normalize)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_magnitude_trim_count_and_entries():
    d = t([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    out = magnitude(d, 0.5)  # k = int(0.5 * 6) = 3
    assert torch.equal(out, t([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    assert torch.equal(magnitude(d, 1.0), d)
    assert torch.count_nonzero(magnitude(d, 0.1)) == 0  # k = 0 (mergekit would assert here)


def test_task_arithmetic_and_linear():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 5, generator=g)
    deltas = [torch.randn(4, 5, generator=g) for _ in range(2)]
    weights = [0.8, 0.5]
    # density is not used by task_arithmetic (as in mergekit)
    got = merge_tensor("task_arithmetic", base, deltas, weights, [0.2, 0.2], lambda_=0.6)
    want = ref_task_arithmetic(base.numpy(), [d.numpy() for d in deltas], weights, lam=0.6)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    # linear = weighted average of the models base + d_i
    got = merge_tensor("linear", base, deltas, weights)
    want = sum(w * (base + d) for w, d in zip(weights, deltas)) / sum(weights)
    assert torch.allclose(got, want, atol=1e-6)


# ----------------------------------------------------------------------------- tiny models and adapters
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(63)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base_dir, path, seed, **lora_kwargs):
    """Save a LoRA adapter with random nonzero B (and trained full modules, if any); return peft's merge."""
    from tests.conftest import save_lora_adapter

    return save_lora_adapter(load(base_dir), path, seed, **lora_kwargs).merge_and_unload().eval()


def weights_of(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7]])


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a, b = root / "sft", root / "dpo"
    return {"sft": (a, make_adapter(base_dir, a, 1)), "dpo": (b, make_adapter(base_dir, b, 2))}


# ----------------------------------------------------------------------------- LoRA deltas are exact
def test_task_arithmetic_single_lora_equals_peft_merge(base_dir, adapters, tmp_path):
    adapter, peft_merged = adapters["sft"]
    out = tmp_path / "merged"
    summary = merge_models(base_dir, [MergeInput(adapter)], "task_arithmetic", out)

    ref = peft_merged.state_dict()
    got = weights_of(out)
    for name, tensor in got.items():
        assert torch.allclose(tensor, ref[name], atol=1e-5), name
    assert summary["tensors_merged"] == 14  # 7 linear modules x 2 layers
    assert summary == json.loads((out / "merge_summary.json").read_text())
    assert summary["inputs"][0]["kind"] == "lora" and summary["inputs"][0]["sparsity"] == 0.0
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f

    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, peft_merged(IDS).logits, atol=1e-5)


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"use_rslora": True, "r": 8, "lora_alpha": 4},
        {
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"layers.1.mlp.down_proj": 32},
            "modules_to_save": ["model.norm"],
        },
    ],
    ids=["rslora", "patterns+modules_to_save"],
)
def test_lora_scaling_variants_match_peft(base_dir, tmp_path, lora_kwargs):
    peft_merged = make_adapter(base_dir, tmp_path / "ad", 3, **lora_kwargs)
    base = weights_of(base_dir)
    deltas = lora_deltas(tmp_path / "ad", base_dir)
    ref = peft_merged.state_dict()
    for name, d in deltas.items():
        assert torch.allclose(base[name] + d, ref[name], atol=1e-5), name
    if "modules_to_save" in lora_kwargs:
        assert "model.norm.weight" in deltas and deltas["model.norm.weight"].abs().sum() > 0


def test_full_model_input(base_dir, adapters, tmp_path):
    _, peft_merged = adapters["dpo"]
    full = tmp_path / "full"
    peft_merged.save_pretrained(full)
    assert set(full_deltas(base_dir, full)) == set(weights_of(base_dir))
    out = tmp_path / "merged"
    summary = merge_models(base_dir, [MergeInput(full)], "task_arithmetic", out)
    assert summary["inputs"][0]["kind"] == "full"
    ref = weights_of(full)
    for name, tensor in weights_of(out).items():
        assert torch.allclose(tensor, ref[name], atol=1e-6), name


def test_sharded_untied_base_with_embedding_lora(tmp_path):
    """Embedding LoRA ((B @ A).T), lm_head LoRA plus the base_layer weights peft saves with it, sharded base."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    cfg = tiny_config()
    cfg.tie_word_embeddings = False
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base, max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    peft_merged = make_adapter(base, tmp_path / "ad", 5, target_modules=["embed_tokens", "lm_head", "q_proj"])

    out = tmp_path / "merged"
    summary = merge_models(base, [MergeInput(tmp_path / "ad")], "task_arithmetic", out)
    assert summary["tensors_merged"] == 4
    deltas = lora_deltas(tmp_path / "ad", base)
    assert all(deltas[f"{m}.weight"].abs().sum() > 0 for m in ("model.embed_tokens", "lm_head"))
    assert (out / "model.safetensors.index.json").is_file()
    model = load(out)
    ref = peft_merged.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, ref[name], atol=1e-5), name
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, peft_merged(IDS).logits, atol=1e-5)


# ----------------------------------------------------------------------------- two adapters with ties
def test_two_adapters_ties_matches_reference(base_dir, adapters, tmp_path):
    (a, merged_a), (b, merged_b) = adapters["sft"], adapters["dpo"]
    out = tmp_path / "ties"
    inputs = [MergeInput(a, weight=1.0, density=0.5), MergeInput(b, weight=0.7, density=0.3)]
    summary = merge_models(base_dir, inputs, "ties", out, lambda_=0.9)

    base = weights_of(base_dir)
    ref_a, ref_b = merged_a.state_dict(), merged_b.state_dict()
    got = weights_of(out)
    changed = 0
    for name, b0 in base.items():
        da, db = (ref_a[name] - b0).numpy(), (ref_b[name] - b0).numpy()
        if not (da.any() or db.any()):
            assert torch.equal(got[name], b0), name  # untouched tensors are copied
            continue
        changed += 1
        want = ref_ties(b0.numpy(), [da, db], [1.0, 0.7], [0.5, 0.3], lam=0.9)
        np.testing.assert_allclose(got[name].numpy(), want, atol=1e-5, err_msg=name)
    assert changed == summary["tensors_merged"] == 14
    assert summary["normalize"] is True and summary["lambda"] == 0.9
    assert [round(i["sparsity"], 2) for i in summary["inputs"]] == [0.5, 0.7]

    model = load(out)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


# ----------------------------------------------------------------------------- failures leave nothing behind
def leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]


def test_unknown_method(base_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(PaftError, match=r"'bogus'.*known methods: linear, task_arithmetic, ties"):
        merge_models(base_dir, [MergeInput(adapters["sft"][0])], "bogus", out)
    assert leftovers(out) == []


def test_delta_key_absent_from_base(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    # LoRA on lm_head: the tied base stores no lm_head.weight
    model = get_peft_model(load(base_dir), LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"]))
    model.save_pretrained(tmp_path / "ad")
    out = tmp_path / "merged"
    with pytest.raises(PaftError, match=r"ad.*'lm_head.weight'"):
        merge_models(base_dir, [MergeInput(tmp_path / "ad")], "ties", out)
    assert leftovers(out) == []


def test_failure_while_writing_keeps_old_output(base_dir, adapters, tmp_path, monkeypatch):
    import paft.merge.io as merge_io

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merge_io, "write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_models(base_dir, [MergeInput(adapters["sft"][0])], "ties", out)
    assert leftovers(out) == ["merged"] and [p.name for p in out.iterdir()] == ["old.txt"]
