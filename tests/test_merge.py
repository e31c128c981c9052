"""Merge engine: methods against independent reference implementations, LoRA deltas against peft."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from paft.errors import PaftError
from paft.merge import METHODS, MergeInput, full_deltas, get_method, lora_deltas, merge_models, merge_tensor
from paft.merge.methods import top_k_mask

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
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"}
    # (sparsification, consensus, normalize, rescale) by default: mergekit 0.1.5's registry (peft's for
    # magnitude_prune, which mergekit does not register)
    assert {n: (s.sparsification, s.consensus, s.default_normalize, s.default_rescale) for n, s in METHODS.items()} == {
        "linear": (None, None, True, False),
        "task_arithmetic": (None, None, False, False),
        "ties": ("magnitude", "sum", True, False),
        "dare_linear": ("random", None, False, True),
        "dare_ties": ("random", "sum", False, True),
        "magnitude_prune": ("magnitude", None, False, False),
    }
    assert get_method("magnitude_prune").mergekit is None and get_method("dare_ties").mergekit == "dare_ties"


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


def magnitude(d, density, rescale_norm=None):
    """One delta trimmed by magnitude (magnitude_prune of a single input onto a zero base)."""
    return merge_tensor("magnitude_prune", torch.zeros_like(d), [d], [1.0], [density],
                        rescale=rescale_norm is not None, rescale_norm=rescale_norm or "l1")


def test_magnitude_trim_count_and_entries():
    d = t([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    out = magnitude(d, 0.5)  # k = int(0.5 * 6) = 3
    assert torch.equal(out, t([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    assert torch.equal(magnitude(d, 1.0), d)
    # k = max(1, int(density * numel)) (mergekit 0.1.5): a positive density keeps at least one entry
    assert torch.equal(magnitude(d, 0.1), t([[0.0, -5.0, 0.0], [0.0, 0.0, 0.0]]))


def test_magnitude_rescale_norms():
    d = t([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    kept = t([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]])
    l1 = magnitude(d, 0.5, rescale_norm="l1")  # mergekit: times ||d||_1 / ||kept||_1
    assert torch.allclose(l1, kept * (7.65 / 7.3))
    assert torch.allclose(magnitude(d, 0.5, rescale_norm="density"), kept / 0.5)  # DARE paper: 1 / density
    assert torch.equal(magnitude(d, 1.0, rescale_norm="density"), d)  # density 1: untouched, not rescaled


def test_top_k_ties_at_the_threshold():
    # |d| = 3, 1, 2, 1, 1, 2: k = 3 keeps the 3, then one of the two 2s... k = 4 one of the three 1s
    d = t([3.0, -1.0, 2.0, 1.0, -1.0, -2.0])
    assert top_k_mask(d, 3, "index").tolist() == [True, False, True, False, False, True]
    assert top_k_mask(d, 4, "index").tolist() == [True, True, True, False, False, True]  # lowest index first
    # "sort" keeps what a full descending argsort keeps (mergekit's choice), whatever order that gives ties
    g = torch.Generator().manual_seed(3)
    many = torch.randint(-6, 7, (5000,), generator=g).float()  # ~400 entries share each value
    for k in (1, 777, 2500, 4999):
        want = torch.zeros(5000, dtype=torch.bool)
        want[torch.argsort(many.abs(), descending=True)[:k]] = True
        assert torch.equal(top_k_mask(many, k, "sort"), want)
        got = top_k_mask(many, k, "index")
        assert int(got.sum()) == k
        # both keep everything above the k-th largest |d| and nothing below it
        kth = many.abs().sort(descending=True).values[k - 1]
        assert got[many.abs() > kth].all() and not got[many.abs() < kth].any()
    with pytest.raises(PaftError, match="tie_break"):
        top_k_mask(d, 3, "random")


def test_frequency_sign_by_hand():
    # three inputs: at entry 0 two small positives outvote one large negative by count, not by mass
    base = t([0.0, 0.0])
    deltas = [t([1.0, -1.0]), t([1.0, -1.0]), t([-5.0, 3.0])]
    total = merge_tensor("ties", base, deltas, [1.0, 1.0, 1.0], sign="total")
    frequency = merge_tensor("ties", base, deltas, [1.0, 1.0, 1.0], sign="frequency")
    assert torch.allclose(total, t([-5.0, 3.0])) and torch.allclose(frequency, t([1.0, -1.0]))
    # mergekit's names for the same two
    assert torch.equal(merge_tensor("ties", base, deltas, [1.0] * 3, sign="count"), frequency)
    assert torch.equal(merge_tensor("ties", base, deltas, [1.0] * 3, sign="sum"), total)
    with pytest.raises(PaftError, match="majority sign"):
        merge_tensor("ties", base, deltas, [1.0] * 3, sign="majority")


def test_magnitude_prune_by_hand():
    base = t([10.0, 10.0, 10.0, 10.0])
    d1, d2 = [1.0, -2.0, 0.5, 3.0], [-0.5, -1.0, 2.0, -4.0]
    # density 0.5: d1 -> [0,-2,0,3], d2 -> [0,0,2,-4]; no sign election, weighted sum, no normalize by default
    got = merge_tensor("magnitude_prune", base, [t(d1), t(d2)], [1.0, 0.5], [0.5, 0.5], lambda_=2.0)
    assert torch.allclose(got, t([10.0, 6.0, 12.0, 12.0]))
    got = merge_tensor("magnitude_prune", base, [t(d1), t(d2)], [1.0, 0.5], [0.5, 0.5], normalize=True)
    assert torch.allclose(got, t([10.0, 10 - 2 / 1.5, 10 + 1 / 1.5, 10 + 1 / 1.5]))


def dare_masks(shape, densities, seed, name):
    """The masks DARE draws: one generator per input and chunk of rows (here one chunk)."""
    from paft.merge.methods import chunk_generator, random_mask
    from paft.merge.select import chunks

    assert len(chunks(shape)) == 1
    return [random_mask(math.prod(shape), rho, chunk_generator(seed, name, i, 0)).view(shape)
            for i, rho in enumerate(densities)]


def test_dare_ties_is_ties_over_dare_masks():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, 40, generator=g)
    deltas = [torch.randn(30, 40, generator=g) for _ in range(2)]
    weights, densities = [1.0, 0.6], [0.4, 0.7]
    got = merge_tensor("dare_ties", base, deltas, weights, densities, seed=9, name="w", rescale_norm="density")
    dropped = [d * m / rho for d, m, rho in zip(deltas, dare_masks((30, 40), densities, 9, "w"), densities)]
    want = ref_ties(base.numpy(), [x.numpy() for x in dropped], weights, [1.0, 1.0], normalize=False)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # dare_linear: the same masks, summed without sign election
    got = merge_tensor("dare_linear", base, deltas, weights, densities, seed=9, name="w", rescale_norm="density")
    want = ref_task_arithmetic(base.numpy(), [x.numpy() for x in dropped], weights)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    # rescale off: the kept entries are the delta's own
    plain = merge_tensor("dare_linear", base, deltas[:1], [1.0], [0.4], seed=9, name="w", rescale=False)
    kept = plain != base
    assert torch.allclose(plain[kept], (base + deltas[0])[kept])


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
    # without normalize, mergekit's linear is the weighted sum of the models (the base counted sum(w) times)
    got = merge_tensor("linear", base, deltas, weights, normalize=False)
    assert torch.allclose(got, sum(w * (base + d) for w, d in zip(weights, deltas)), atol=1e-6)


# ----------------------------------------------------------------------------- tiny models and adapters
def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    } | overrides)


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


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties", "magnitude_prune"])
def test_chunks_and_threads_do_not_change_the_merge(base_dir, tmp_path, monkeypatch, method):
    """Tensors split in many row chunks (merged on 1 or 3 threads) give the bits of a one-chunk merge; DARE's
    masks are drawn per chunk, so with a fixed chunk size its merges match across thread counts."""
    import paft.merge.select as select
    from transformers import AutoModelForCausalLM

    for i in (1, 2):  # full models: bf16 deltas, ties at the threshold
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * (torch.rand_like(p) < 0.5 * i))
        model.save_pretrained(tmp_path / f"ft{i}")
    inputs = [MergeInput(tmp_path / "ft1", 0.7, 0.3), MergeInput(tmp_path / "ft2", 1.2, 0.6)]

    def merged(out, threads):
        merge_models(base_dir, inputs, method, tmp_path / out, threads=threads, seed=4)
        return weights_of(tmp_path / out)

    if method != "dare_ties":
        whole = merged("whole", 1)
    monkeypatch.setattr(select, "CHUNK", 96)  # every matrix in several chunks of whole rows
    one, three = merged("one", 1), merged("three", 3)
    assert all(torch.equal(one[n], three[n]) for n in one)
    if method != "dare_ties":
        assert all(torch.equal(one[n], whole[n]) for n in one)


def test_adapter_output_and_model_card(base_dir, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = [MergeInput(adapters["sft"][0], 1.0, 1.0)]
    summary = merge_models(base_dir, inputs, "task_arithmetic", tmp_path / "m", adapter_rank=8)
    # one rank-8 LoRA merged alone is exactly representable at rank 8: the adapter gives the merged model back
    assert summary["adapter"]["rel_error_max"] < 1e-5
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "m" / "adapter")
    with torch.no_grad():
        assert torch.allclose(peft_model(IDS).logits, load(tmp_path / "m")(IDS).logits, atol=1e-4)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "task_arithmetic" in card and "adapter_rank: 8" in card and "sha256" in card


def test_options_recorded_and_dare_on_adapters(base_dir, adapters, tmp_path):
    (a, _), (b, _) = adapters["sft"], adapters["dpo"]
    inputs = [MergeInput(a, weight=1.0, density=0.5), MergeInput(b, weight=0.7, density=0.3)]
    summary = merge_models(base_dir, inputs, "dare_ties", tmp_path / "d1", seed=3, sign="frequency",
                           rescale_norm="density")
    assert {k: summary[k] for k in ("method", "normalize", "rescale", "rescale_norm", "sign", "tie_break",
                                    "delta_dtype", "seed", "mergekit")} == {
        "method": "dare_ties", "normalize": False, "rescale": True, "rescale_norm": "density", "sign": "frequency",
        "tie_break": None, "delta_dtype": "input", "seed": 3, "mergekit": "dare_ties",
    }
    # kept shares near the densities (LoRA deltas are dense), the same bits again under the same seed
    assert [round(i["sparsity"], 1) for i in summary["inputs"]] == [0.5, 0.7]
    merge_models(base_dir, inputs, "dare_ties", tmp_path / "d2", seed=3, sign="frequency", rescale_norm="density")
    w1, w2 = weights_of(tmp_path / "d1"), weights_of(tmp_path / "d2")
    assert all(torch.equal(w1[n], w2[n]) for n in w1)

    summary = merge_models(base_dir, inputs, "ties", tmp_path / "t", tie_break="index")
    assert (summary["sign"], summary["rescale"], summary["rescale_norm"], summary["tie_break"]) == (
        "total", False, None, "index")
    summary = merge_models(base_dir, inputs, "task_arithmetic", tmp_path / "ta", sign="frequency", rescale=True)
    assert (summary["sign"], summary["rescale"], summary["tie_break"]) == (None, None, None)  # no such steps


def test_linear_without_normalize_scales_untouched_tensors(base_dir, adapters, tmp_path):
    inputs = [MergeInput(adapters["sft"][0], weight=0.5), MergeInput(adapters["dpo"][0], weight=0.25)]
    summary = merge_models(base_dir, inputs, "linear", tmp_path / "lin", normalize=False)
    base, got = weights_of(base_dir), weights_of(tmp_path / "lin")
    # sum_i w_i m_i: a tensor no adapter touches is 0.75 * base (mergekit's linear of the two models)
    assert torch.allclose(got["model.norm.weight"], 0.75 * base["model.norm.weight"])
    assert summary["tensors_merged"] == len(base)


def test_bf16_deltas_formed_in_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.5)
    model.save_pretrained(tmp_path / "ft")
    base, ft = weights_of(tmp_path / "base"), weights_of(tmp_path / "ft")
    as_input = full_deltas(tmp_path / "base", tmp_path / "ft", dtype="input")
    exact = full_deltas(tmp_path / "base", tmp_path / "ft")  # float32 by default
    name = "model.layers.0.mlp.up_proj.weight"
    assert as_input[name].dtype == exact[name].dtype == torch.float32
    assert torch.equal(as_input[name], (ft[name] - base[name]).float())  # a bf16 subtraction, like mergekit's
    assert torch.equal(exact[name], ft[name].float() - base[name].float())
    assert not torch.equal(as_input[name], exact[name])  # some differences need more than bf16's 8 bits
    summary = merge_models(tmp_path / "base", [MergeInput(tmp_path / "ft", density=0.3)], "ties", tmp_path / "m")
    assert summary["delta_dtype"] == "input"
    assert weights_of(tmp_path / "m")[name].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sign": "majority"}, "majority sign"),
        ({"rescale_norm": "l2"}, "rescale norm"),
        ({"tie_break": "random"}, "tie_break"),
        ({"delta_dtype": "int8"}, "delta dtype"),
    ],
)
def test_bad_options(base_dir, adapters, tmp_path, kwargs, match):
    out = tmp_path / "merged"
    with pytest.raises(PaftError, match=match):
        merge_models(base_dir, [MergeInput(adapters["sft"][0])], "ties", out, **kwargs)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- failures leave nothing behind
def leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]


def test_unknown_method(base_dir, adapters, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(
        PaftError,
        match=r"'bogus'.*known methods: dare_linear, dare_ties, linear, magnitude_prune, task_arithmetic, ties",
    ):
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


def test_cli_merges_with_dare_options_reproducibly(base_dir, adapters, tmp_path):
    import subprocess
    import sys

    def run(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "paft.cli", "merge", str(base_dir), *(str(a) for a, _ in adapters.values()),
                               "--method", "dare_ties", "--density", "0.5", "--out", str(tmp_path / out), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    a = run("a", "--seed", "3", "--sign", "frequency", "--no-rescale")
    assert (a["method"], a["sign"], a["rescale"], a["seed"]) == ("dare_ties", "frequency", False, 3)
    run("b", "--seed", "3", "--sign", "frequency", "--no-rescale")
    run("c", "--seed", "4", "--sign", "frequency", "--no-rescale")
    weights = {name: weights_of(tmp_path / name) for name in "abc"}
    changed = [n for n in weights["a"] if not torch.equal(weights["a"][n], weights["c"][n])]
    assert all(torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"])  # same seed, same merge
    assert changed  # another seed draws other masks
