"""The merge methods against mergekit 0.1.5 (a development dependency), on the same tiny models.

A tiny Llama base (bf16 and float32) and two "fine-tuned" full models (one dense delta, one with ~10% of
the entries changed), saved with ``save_pretrained``; mergekit runs in-process (``run_merge``) and ours
(``merge_models``) with the same parameters; every output tensor is compared entry by entry:

- *equal within bf16 rounding*: ``|ours - mergekit| <= 4 ulp`` of the largest operand of the final
  ``base + merged delta`` (bf16 ulp for bf16 models, float32 ulp for float32 ones): mergekit computes in
  the models' dtype (bf16: every intermediate rounded, weights too), we in float32;
- every other entry must be *explained by a tie at the density threshold*: for some input whose delta is
  sparsified by magnitude, ``|delta|`` there equals that input's k-th largest ``|delta|`` (bf16 deltas take
  few distinct values, so many entries share the threshold value and which of them a top-k keeps is the
  sort's choice).

With ``tie_break="sort"`` we keep mergekit's choice, so every entry is within rounding; with
``"index"`` (the default, no sort) the differences are only at the threshold ties. DARE is random: checked statistically (kept
share, rescale factor, against mergekit's too) and for determinism under a seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit (dev dependency) is not installed")

from paft.merge import MergeInput, merge_models  # noqa: E402
from paft.merge.methods import chunk_generator, keep_count, merge_tensor  # noqa: E402

MODELS = ("dense", "sparse")


# ----------------------------------------------------------------------------- tiny models
def tiny_config():
    from tests.test_merge import tiny_config

    return tiny_config(vocab_size=128, hidden_size=64, intermediate_size=160, tie_word_embeddings=False)


def build_models(root: Path, dtype: torch.dtype) -> Path:
    """base, dense (every entry + N(0, 0.002)) and sparse (10% of the entries + N(0, 0.01)) under ``root``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).to(dtype)
    model.save_pretrained(root / "base")
    base = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in MODELS:
        tuned = {}
        for key, w in base.items():
            if name == "dense":
                d = torch.randn(w.shape, generator=g) * 0.002
            else:
                d = torch.randn(w.shape, generator=g) * 0.01 * (torch.rand(w.shape, generator=g) < 0.1)
            tuned[key] = (w.float() + d).to(dtype)
        model.load_state_dict(tuned)
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_models")
    return {"bf16": build_models(root / "bf16", torch.bfloat16), "f32": build_models(root / "f32", torch.float32)}


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------- mergekit in-process
# mergekit methods with our semantics that mergekit 0.1.5 does not register under a name (its generalized task
# arithmetic fixes the consensus per method: no config parameter selects "count"): its own class, registered
# here under a test name. name -> (consensus_method, sparsification_method, default_normalize)
_UNREGISTERED = {
    "magnitude_prune": (None, "magnitude", False),
    "ties-frequency": ("count", "magnitude", True),
}
_REGISTERED: dict[str, str] = {}


def mergekit_method(name: str, sign: str | None = None) -> str:
    """mergekit's method for ours (``ties`` with the ``frequency`` sign: ``ties-frequency``)."""
    key = f"{name}-frequency" if sign == "frequency" else name
    if key not in _UNREGISTERED:
        return name
    if key not in _REGISTERED:
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
        from mergekit.sparsify import SparsificationMethod

        consensus, sparsification, normalize = _UNREGISTERED[key]
        method = GeneralizedTaskArithmeticMerge(
            consensus_method=ConsensusMethod(consensus) if consensus else None,
            sparsification_method=SparsificationMethod(sparsification),
            default_normalize=normalize,
            default_rescale=False,
            method_name=f"paft_test_{key}",
            method_pretty_name=None,
            method_reference_url=None,
        )
        try:
            registry.register(method)
        except ValueError:  # registered already (this module imported twice)
            pass
        _REGISTERED[key] = method.spec.name
    return _REGISTERED[key]


def run_mergekit(
    root: Path,
    out: Path,
    method: str,
    weights,
    densities,
    params: dict,
    *,
    sign: str | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    extra: dict | None = None,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = {
        "merge_method": mergekit_method(method, sign),
        "parameters": params,
        "models": [
            {"model": str(root / m), "parameters": {"weight": w, "density": d, **(extra or {})}}
            for m, w, d in zip(MODELS, weights, densities)
        ],
    }
    if method != "linear":  # mergekit's linear averages the models listed (the base is not among them)
        cfg["base_model"] = str(root / "base")
    if dtype:
        cfg["dtype"] = dtype
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    options = MergeOptions(cuda=False, quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), options)
    return weights_of(out)


def run_ours(root: Path, out: Path, method: str, weights, densities, **kwargs) -> dict[str, torch.Tensor]:
    """Our merge of the same models; mergekit's top-k tie order (``tie_break="sort"``) unless told otherwise."""
    kwargs.setdefault("tie_break", "sort")
    inputs = [MergeInput(root / m, weight=w, density=d) for m, w, d in zip(MODELS, weights, densities)]
    merge_models(root / "base", inputs, method, out, **kwargs)
    return weights_of(out)


# ----------------------------------------------------------------------------- the comparison
# mergekit's bf16 computation rounds up to six times (the weights to bf16, w_i * d_i, the sum, the division
# by the weights, lambda, base + merged), each by up to half an ulp of that step's result, ours once (float32
# to bf16): apart by up to ~4 ulps of the largest operand (3.0 seen here, where the weights 0.7 and 1.3 are
# not bf16 numbers). A kept or dropped delta entry is a difference of the size of the delta itself.
ULPS = 4

MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.abs().double().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - MANTISSA[dtype])


def thresholds(
    root: Path, name: str, densities, sparsified: bool, delta_dtype: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per input: ``|delta|`` and its k-th largest value (the top-k threshold), for magnitude methods."""
    if not sparsified:
        return []
    base = weights_of(root / "base")[name]
    out = []
    for m, rho in zip(MODELS, densities):
        if rho >= 1:
            continue
        t = weights_of(root / m)[name]
        if delta_dtype == "float32":
            t, b = t.float(), base.float()
        else:
            b = base
        a = (t - b).abs().float().reshape(-1)
        k = keep_count(a.numel(), rho)
        out.append((a, torch.topk(a, k).values.min()))
    return out


def compare(
    root: Path, ours: dict, theirs: dict, method: str, weights, densities, lam: float = 1.0, delta_dtype: str = "input"
) -> dict:
    """Entry-by-entry comparison of every tensor (see the module docstring); returns the counts.

    Within rounding: ``|ours - mergekit| <= ULPS ulp(s)`` in the models' dtype, ``s`` the largest magnitude
    among the operands and results of the final ``base + merged``: ``|base|``, both outputs, both merged
    deltas, ``|lambda| * sum_i |w_i d_i|`` (for ``linear``, mergekit's ``sum_i |w_i m_i|``).
    """
    base = weights_of(root / "base")
    inputs = [weights_of(root / m) for m in MODELS]
    assert sorted(ours) == sorted(theirs) == sorted(base)
    sparsified = method in ("ties", "magnitude_prune")
    total = exact = one_ulp = close = tie = unexplained = 0
    worst = 0.0
    for name, b in base.items():
        a, t = ours[name], theirs[name]
        assert a.dtype == t.dtype == b.dtype and a.shape == t.shape, name
        a64, t64, b64 = a.double(), t.double(), b.double()
        operands = sum(abs(w) * (m[name].double() - b64).abs() for w, m in zip(weights, inputs)) * abs(lam)
        if method == "linear":
            operands = torch.maximum(operands, sum(abs(w) * m[name].double().abs() for w, m in zip(weights, inputs)))
        scale = torch.stack([b64.abs(), operands, a64.abs(), t64.abs(), (a64 - b64).abs(), (t64 - b64).abs()]).amax(0)
        ratio = (a64 - t64).abs() / spacing(scale, b.dtype)
        ok = ratio <= ULPS
        total += a.numel()
        exact += int((a == t).sum())
        one_ulp += int((ratio <= 1).sum())
        close += int(ok.sum())
        worst = max(worst, float(ratio[ok].max()) if ok.any() else 0.0)
        if not ok.all():
            tied = torch.zeros(a.numel(), dtype=torch.bool)
            for absd, thr in thresholds(root, name, densities, sparsified, delta_dtype):
                if thr > 0:  # a zero threshold: the entries it could drop are zero anyway
                    tied |= absd == thr
            bad = ~ok.reshape(-1)
            tie += int((bad & tied).sum())
            unexplained += int((bad & ~tied).sum())
    return {
        "entries": total,
        "exact": exact,
        "within_1_ulp": one_ulp,
        "within_rounding": close,
        "share_within_rounding": close / total,
        "threshold_ties": tie,
        "unexplained": unexplained,
        "worst_ulps": worst,
    }


# every deterministic configuration: (method, weights, densities, mergekit parameters, our options)
CASES = {
    "ties-0.2-total": ("ties", (0.7, 1.3), (0.2, 0.2), {"normalize": True, "lambda": 0.9}, {}),
    "ties-0.5-nonorm-total": ("ties", (0.7, 1.3), (0.5, 0.5), {"normalize": False, "lambda": 1.2}, {}),
    "ties-0.5-nonorm-frequency": (
        "ties", (0.7, 1.3), (0.5, 0.5), {"normalize": False, "lambda": 1.2}, {"sign": "frequency"}
    ),
    "ties-0.2/0.5-frequency": ("ties", (1.1, 0.6), (0.2, 0.5), {"normalize": True}, {"sign": "frequency"}),
    "ties-0.5/0.2-rescale": ("ties", (0.7, 1.3), (0.5, 0.2), {"rescale": True}, {"rescale": True}),
    "task_arithmetic": ("task_arithmetic", (0.7, 1.3), (1.0, 1.0), {"lambda": 0.8}, {}),
    "task_arithmetic-normalize": ("task_arithmetic", (0.7, 1.3), (1.0, 1.0), {"normalize": True, "lambda": 1.5}, {}),
    "linear": ("linear", (0.7, 1.3), (1.0, 1.0), {}, {}),
    "linear-nonorm": ("linear", (0.6, 0.9), (1.0, 1.0), {"normalize": False}, {}),
    "magnitude_prune": ("magnitude_prune", (0.7, 1.3), (0.2, 0.5), {"lambda": 0.9}, {}),
}


def our_options(mk_params: dict, extra: dict) -> dict:
    opts = {"lambda_": mk_params.get("lambda", 1.0), **extra}
    if "normalize" in mk_params:
        opts["normalize"] = mk_params["normalize"]
    return opts


def cross_check(models, tmp_path, key, case, **ours_extra):
    method, weights, densities, mk_params, extra = CASES[case]
    root = models[key]
    theirs = run_mergekit(root, tmp_path / "mk", method, weights, densities, mk_params, sign=extra.get("sign"))
    opts = {**our_options(mk_params, extra), **ours_extra}
    ours = run_ours(root, tmp_path / "ours", method, weights, densities, **opts)
    return compare(root, ours, theirs, method, weights, densities, mk_params.get("lambda", 1.0))


@pytest.mark.parametrize("key", ["bf16", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_methods_match_mergekit(models, tmp_path, key, case):
    r = cross_check(models, tmp_path, key, case)
    print(key, case, r)
    # mergekit's top-k choice kept (tie_break="sort"): every entry equal within rounding, no tie left
    assert r["share_within_rounding"] == 1.0 and r["threshold_ties"] == r["unexplained"] == 0, r
    if key == "f32" and not case.startswith("linear"):  # float32 on both sides, the same operations
        assert r["exact"] / r["entries"] > 0.999, r


def test_index_tie_break_differs_only_at_the_threshold(models, tmp_path):
    """Without the full sort (lowest index first among ties) the differences are only at threshold ties."""
    r = cross_check(models, tmp_path, "bf16", "ties-0.2-total", tie_break="index")
    print(r)
    assert r["unexplained"] == 0 and r["threshold_ties"] > 0, r
    assert r["within_rounding"] + r["threshold_ties"] == r["entries"]


def test_float32_deltas_match_mergekit_float32_dtype(models, tmp_path):
    """mergekit with ``dtype: float32`` subtracts bf16 models in float32: ours with delta_dtype="float32"."""
    method, weights, densities, mk_params, extra = CASES["ties-0.2-total"]
    root = models["bf16"]
    theirs = run_mergekit(
        root, tmp_path / "mk", method, weights, densities, mk_params, dtype="float32", out_dtype="bfloat16"
    )
    ours = run_ours(root, tmp_path / "ours", method, weights, densities, delta_dtype="float32", lambda_=0.9)
    r = compare(root, ours, theirs, method, weights, densities, 0.9, delta_dtype="float32")
    print(r)
    # float32 arithmetic on both sides; only the final rounding to bf16
    assert r["share_within_rounding"] == 1.0 and r["exact"] / r["entries"] > 0.999, r
    # ... while bf16 deltas (mergekit's default) keep other entries there: not a rounding difference
    default = run_ours(root, tmp_path / "ours_input", method, weights, densities, lambda_=0.9)
    r = compare(root, default, theirs, method, weights, densities, 0.9, delta_dtype="float32")
    assert r["within_rounding"] < r["entries"], r


def test_magnitude_prune_against_breadcrumbs_gamma_0(models, tmp_path):
    """mergekit's breadcrumbs with gamma 0 is magnitude pruning too, with another order among threshold ties."""
    method, weights, densities, mk_params, _ = CASES["magnitude_prune"]
    root = models["bf16"]
    theirs = run_mergekit(root, tmp_path / "mk", "breadcrumbs", weights, densities, mk_params, extra={"gamma": 0.0})
    ours = run_ours(root, tmp_path / "ours", method, weights, densities, lambda_=0.9)
    r = compare(root, ours, theirs, method, weights, densities, 0.9)
    print(r)
    assert r["unexplained"] == 0 and r["share_within_rounding"] > 0.99, r


# ----------------------------------------------------------------------------- DARE
def binomial_ok(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def dare(d, p, rescale_norm=None):
    """One delta after DARE's drop (dare_linear of a single input onto a zero base, seed 0)."""
    return merge_tensor("dare_linear", torch.zeros_like(d), [d], [1.0], [p], name="w",
                        rescale=rescale_norm is not None, rescale_norm=rescale_norm or "l1")


def test_dare_mask_share_and_rescale():
    g = torch.Generator().manual_seed(7)
    d = torch.randn(300, 200, generator=g)
    n = d.numel()
    for p in (0.1, 0.3, 0.7):
        exact = dare(d, p, rescale_norm="density")
        kept = exact != 0
        assert binomial_ok(int(kept.sum()), n, p), p
        assert torch.allclose(exact[kept], d[kept] / p, rtol=1e-6, atol=0)  # DARE paper / peft: times 1 / density
        l1 = dare(d, p, rescale_norm="l1")
        assert torch.equal(l1 != 0, kept)  # same generator, same mask
        factor = l1[kept] / d[kept]
        assert torch.allclose(factor, factor[0].expand_as(factor), rtol=1e-6)  # one factor per tensor
        assert math.isclose(float(factor[0]), float(d.abs().sum() / d[kept].abs().sum()), rel_tol=1e-5)
        assert abs(float(factor[0]) * p - 1) < 0.05  # mergekit's l1 rescale is 1 / density on average
        plain = dare(d, p)
        assert torch.equal(plain[kept], d[kept])
    assert torch.equal(dare(d, 1.0), d)


def test_dare_generators_depend_on_seed_name_input_and_chunk_only():
    a = torch.rand(1000, generator=chunk_generator(3, "model.layers.0.q_proj.weight", 1, 2))
    b = torch.rand(1000, generator=chunk_generator(3, "model.layers.0.q_proj.weight", 1, 2))
    assert torch.equal(a, b)
    for other in ((4, "model.layers.0.q_proj.weight", 1, 2), (3, "model.layers.1.q_proj.weight", 1, 2),
                  (3, "model.layers.0.q_proj.weight", 0, 2), (3, "model.layers.0.q_proj.weight", 1, 0)):
        assert not torch.equal(a, torch.rand(1000, generator=chunk_generator(*other)))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_models_seeded_and_statistically_like_mergekit(models, tmp_path, method):
    root = models["f32"]  # float32: out - base is nonzero exactly where a kept delta is
    weights, densities = (0.7, 1.3), (0.3, 0.6)
    base, dense, sparse = (weights_of(root / m) for m in ("base", "dense", "sparse"))
    one = run_ours(root, tmp_path / "a", method, weights, densities, seed=5)
    again = run_ours(root, tmp_path / "b", method, weights, densities, seed=5)
    other = run_ours(root, tmp_path / "c", method, weights, densities, seed=6)
    assert all(torch.equal(one[n], again[n]) for n in one)  # same seed: the same bits
    assert sum(not torch.equal(one[n], other[n]) for n in one) == len(one)  # another seed: every tensor differs

    # every tensor as merge_tensor gives it alone (its masks do not depend on which tensors came before)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        alone = merge_tensor(method, base[name], [dense[name] - base[name], sparse[name] - base[name]],
                             weights, densities, seed=5, name=name)
        assert torch.equal(alone, one[name]), name

    # single input, so the kept share and the rescale factor can be read off the output
    # (mergekit draws from torch's global RNG: a seed unrelated to the one that drew the models' deltas)
    mk = run_mergekit(root, tmp_path / "mk", method, (0.7,), (0.3,), {}, seed=20240607)
    ours = merge_models(root / "base", [MergeInput(root / "dense", 0.7, 0.3)], method, tmp_path / "d", seed=5)
    ours = weights_of(tmp_path / "d")
    n_total = kept_ours = kept_mk = 0
    for name, b in base.items():
        d = dense[name] - b
        for out, label in ((ours, "ours"), (mk, "mk")):
            diff = out[name] - b
            kept = diff != 0
            if label == "ours":
                kept_ours += int(kept.sum())
            else:
                kept_mk += int(kept.sum())
            if b.numel() >= 1024:  # l1 rescale: one factor per tensor, 1 / density up to its sampling error
                factor = float((diff[kept] / (0.7 * d[kept])).median())
                sd = math.sqrt((1 - 0.3) / (0.3 * b.numel())) * math.sqrt(math.pi / 2)  # relative, Gaussian d
                assert abs(factor * 0.3 - 1) < 5 * sd, (label, name, factor)
        n_total += b.numel()
    assert binomial_ok(kept_ours, n_total, 0.3) and binomial_ok(kept_mk, n_total, 0.3), (kept_ours, kept_mk, n_total)
