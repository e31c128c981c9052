"""Merge methods, declared as data (mergekit's "generalized task arithmetic" family).

Every method merges per tensor, from the base tensor and one delta (task vector) per input:

1. *sparsify* each delta on its own (``sparsification``; ``density`` is the share kept): ``magnitude``
   keeps the ``k = max(1, int(density * numel))`` entries of largest ``|delta|``; ``random`` (DARE) keeps
   each entry with probability ``density``. With ``rescale`` the kept entries are scaled up (``l1``:
   by ``||delta||_1 / ||kept||_1``, mergekit 0.1.5; ``density``: by ``1 / density``, the DARE paper
   and peft). ``density >= 1`` leaves the delta as it is (no rescaling either);
2. weight it: ``wd_i = w_i * d_i``;
3. *consensus* (``consensus``): elect a sign per entry and keep only the entries that agree with it;
4. sum; with ``normalize`` divide by the sum of the weights that contributed (per entry with a consensus,
   else the sum of all weights); multiply by ``lambda``; add to the base.

This is ``mergekit/merge_methods/generalized_task_arithmetic.py`` (``merge_group``, ``get_mask``) and
``mergekit/sparsify.py`` (``magnitude``, ``bernoulli``, ``rescaled_masked_tensor``) of mergekit 0.1.5,
with the same parameters (``weight``, ``density``, ``normalize``, ``rescale``, ``lambda``), computed in
float32; ``linear`` is ``mergekit/merge_methods/linear.py``. tests/test_merge_mergekit.py runs both on the
same models and compares every output tensor. Where they differ:

- arithmetic is float32 (mergekit computes in the tensors' dtype, e.g. bf16, weights rounded to it too);
- the top-k order among entries whose ``|delta|`` equals the k-th largest: ``tie_break="sort"`` takes
  mergekit's (the order of a full descending ``torch.argsort`` of ``|delta|`` as float32 on CPU, so the
  same torch build picks the same entries; mergekit on a GPU sorts there); ``"index"`` keeps the lowest
  flat indices, without a full sort;
- DARE draws its masks from a ``torch.Generator`` per (seed, tensor name, input), so a seed reproduces
  a merge whatever the order tensors are processed in (mergekit draws from torch's global RNG);
- ``magnitude_prune`` (peft's name: magnitude sparsification, then a weighted sum) has no method in
  mergekit: it is mergekit's generalized task arithmetic with ``sparsification_method=magnitude`` and no
  consensus (the nearest registered one, ``breadcrumbs`` with ``gamma: 0``, keeps the same entries except
  among ties at the threshold, and ``int(density * numel)`` without the floor of 1);
- the majority sign methods are named as in peft: ``total`` (mergekit ``consensus_method: sum``, the
  TIES paper: sign of the summed weighted deltas) and ``frequency`` (mergekit ``count``: sign of the summed
  signs); both names are accepted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from paft.errors import PaftError

Sparsification = Literal["magnitude", "random"]
Consensus = Literal["sum", "count"]
RescaleNorm = Literal["l1", "density"]
TieBreak = Literal["sort", "index"]

# majority sign method: peft's names (``majority_sign_method``) and mergekit's (``consensus_method``)
SIGN_METHODS: dict[str, Consensus] = {"total": "sum", "frequency": "count", "sum": "sum", "count": "count"}
SIGN_NAMES: dict[Consensus, str] = {"sum": "total", "count": "frequency"}
RESCALE_NORMS = ("l1", "density")
TIE_BREAKS = ("sort", "index")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    sparsification: Sparsification | None  # how each delta is trimmed to ``density`` (None: density unused)
    consensus: Consensus | None  # how the sign per entry is elected by default (None: no sign election)
    default_normalize: bool  # divide by the (contributing) weights unless the caller says otherwise
    default_rescale: bool  # scale the kept entries up after sparsifying unless the caller says otherwise
    reference: str
    mergekit: str | None  # the mergekit 0.1.5 method with these semantics (None: none registered)
    # mergekit ``linear`` averages whole models (sum_i w_i m_i [/ sum_i w_i]), not deltas: with m_i = base + d_i
    # that is base + sum_i w_i d_i / sum_i w_i when normalized, and (sum_i w_i) base + sum_i w_i d_i when not
    of_models: bool = False


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("linear", None, None, True, False, "https://arxiv.org/abs/2203.05482", "linear", of_models=True),
        MethodSpec("task_arithmetic", None, None, False, False, "https://arxiv.org/abs/2212.04089", "task_arithmetic"),
        MethodSpec("ties", "magnitude", "sum", True, False, "https://arxiv.org/abs/2306.01708", "ties"),
        MethodSpec("dare_linear", "random", None, False, True, "https://arxiv.org/abs/2311.03099", "dare_linear"),
        MethodSpec("dare_ties", "random", "sum", False, True, "https://arxiv.org/abs/2311.03099", "dare_ties"),
        MethodSpec("magnitude_prune", "magnitude", None, False, False, "https://arxiv.org/abs/2306.01708", None),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise PaftError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def sign_method(spec: MethodSpec, sign: str | None) -> Consensus | None:
    """The consensus a merge uses: ``sign`` (``total``/``frequency``, or mergekit's ``sum``/``count``) for a
    method that elects a sign, else the method's own; None for methods without sign election."""
    if sign is not None and sign not in SIGN_METHODS:
        raise PaftError(f"unknown majority sign method {sign!r}; known: total, frequency (or sum, count)")
    if spec.consensus is None:
        return None
    return spec.consensus if sign is None else SIGN_METHODS[sign]


# ----------------------------------------------------------------------------- step 1: sparsify
def keep_count(numel: int, density: float) -> int:
    """mergekit ``sparsify.magnitude``: ``max(1, int(density * numel))`` entries (``density < 1``)."""
    return max(1, int(density * numel)) if numel else 0


def top_k_mask(delta: torch.Tensor, k: int, tie_break: TieBreak = "sort") -> torch.Tensor:
    """Bool mask of the ``k`` entries of largest ``|delta|``.

    Entries above the k-th largest ``|delta|`` are always kept; among those equal to it (ties at the
    threshold, frequent in bf16 deltas, which take few distinct values) ``tie_break`` decides:
    ``"sort"`` keeps mergekit's choice, the first of a full descending ``torch.argsort`` of ``|delta|`` as
    float32 (CPU); ``"index"`` keeps the lowest flat indices (no full sort).
    """
    a = delta.detach().abs().reshape(-1)
    if a.device.type == "cpu":
        a = a.float()
    n = a.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=a.device)
    if k >= n:
        mask[:] = True
    elif k > 0:
        if tie_break == "sort":
            mask[torch.argsort(a, descending=True)[:k]] = True
        elif tie_break == "index":
            threshold = torch.topk(a, k, sorted=False).values.min()
            mask = a > threshold
            need = k - int(mask.sum())
            if need > 0:
                mask[torch.nonzero(a == threshold).reshape(-1)[:need]] = True
        else:
            raise PaftError(f"unknown tie_break {tie_break!r}; known: {', '.join(TIE_BREAKS)}")
    return mask.view(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (``U[0, 1) < density``)."""
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device) < density


def rescaled(delta: torch.Tensor, mask: torch.Tensor, norm: RescaleNorm | None, density: float) -> torch.Tensor:
    """``delta * mask``, scaled up to make up for what was dropped (mergekit ``rescaled_masked_tensor``).

    ``l1``: by ``||delta||_1 / ||delta * mask||_1`` (left unscaled where either is below 1e-7, as mergekit);
    ``density``: by ``1 / density``; None: not at all.
    """
    kept = delta * mask
    if norm is None:
        return kept
    if norm == "density":
        return kept / density
    if norm == "l1":
        before, after = float(delta.abs().sum()), float(kept.abs().sum())
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    raise PaftError(f"unknown rescale norm {norm!r}; known: {', '.join(RESCALE_NORMS)}")


def magnitude(
    delta: torch.Tensor,
    density: float,
    *,
    rescale_norm: RescaleNorm | None = None,
    tie_break: TieBreak = "sort",
) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest ``|delta|``, zero the rest (mergekit
    ``sparsify.magnitude``); see :func:`top_k_mask` for ties and :func:`rescaled` for ``rescale_norm``."""
    if density >= 1:
        return delta
    mask = top_k_mask(delta, keep_count(delta.numel(), density), tie_break)
    return rescaled(delta, mask, rescale_norm, density)


def dare(
    delta: torch.Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
    rescale_norm: RescaleNorm | None = None,
) -> torch.Tensor:
    """DARE's random drop (mergekit ``sparsify.bernoulli``): keep each entry with probability ``density``."""
    if density >= 1:
        return delta
    return rescaled(delta, random_mask(delta, density, generator), rescale_norm, density)


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A generator for one input's mask of one tensor: a stable hash of (seed, input index, tensor name)."""
    digest = hashlib.blake2b(f"{int(seed)}\0{int(index)}\0{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sparsify(
    spec: MethodSpec,
    delta: torch.Tensor,
    density: float,
    *,
    rescale: bool | None = None,
    rescale_norm: RescaleNorm = "l1",
    tie_break: TieBreak = "sort",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Step 1 for one input's delta (unchanged if the method does not sparsify).

    ``rescale`` defaults to the method's (on for DARE); ``generator`` draws DARE's mask (see
    :func:`tensor_generator`; None: torch's global RNG).
    """
    if spec.sparsification is None:
        return delta
    rescale = spec.default_rescale if rescale is None else rescale
    if rescale_norm not in RESCALE_NORMS:
        raise PaftError(f"unknown rescale norm {rescale_norm!r}; known: {', '.join(RESCALE_NORMS)}")
    norm = rescale_norm if rescale else None
    if spec.sparsification == "magnitude":
        return magnitude(delta, density, rescale_norm=norm, tie_break=tie_break)
    return dare(delta, density, generator=generator, rescale_norm=norm)


# ----------------------------------------------------------------------------- steps 2-4
def sign_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """mergekit ``get_mask``: True where an input's weighted delta has the elected sign.

    ``total`` (``sum``): elected sign = sign of the sum of weighted deltas (the TIES paper);
    ``frequency`` (``count``): sign of the sum of their signs. A zero total elects ``+``. Zero entries
    never agree.
    """
    method = SIGN_METHODS.get(method, method)
    sign = weighted.sign()
    if method == "sum":
        total = weighted.sum(dim=0)
    elif method == "count":
        total = sign.sum(dim=0)
    else:
        raise PaftError(f"unknown majority sign method {method!r}; known: total, frequency (or sum, count)")
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return sign == elected


def combine(
    spec: MethodSpec,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool | None = None,
    lambda_: float = 1.0,
    sign: str | None = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-4 on already sparsified deltas (one per input, same shape): the merged delta (float32).

    Without consensus: ``m = sum_i w_i d_i``, normalized by ``sum_i w_i`` (left as is when ``|sum| < 1e-8``).
    With consensus (``sign``, default the method's): ``m = sum_i w_i d_i [agree_i]``, normalized per entry
    by ``sum_i w_i [agree_i]`` (left as is where that is 0). Then ``m *= lambda`` (after normalizing, as
    mergekit). ``linear`` without normalize is mergekit's ``sum_i w_i m_i`` with ``m_i = base + d_i``: it
    adds ``(sum_i w_i - 1) * base`` (needs ``base``); mergekit's linear has no ``lambda``, here it scales
    the difference from the base.
    """
    normalize = spec.default_normalize if normalize is None else normalize
    consensus = sign_method(spec, sign)
    stacked = torch.stack([d.float() for d in deltas])
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus is not None:
        mask = sign_mask(weighted, consensus).to(stacked.dtype)
        merged = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        merged = merged / divisor
    elif spec.of_models:
        total = float(sum(float(x) for x in weights))
        if total != 1:
            if base is None:
                raise PaftError("linear without normalize scales the base by the sum of the weights: pass base")
            merged = merged + (total - 1) * base.float()
    return merged * lambda_ if lambda_ != 1 else merged


def merge_tensor(
    spec: MethodSpec | str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    normalize: bool | None = None,
    lambda_: float = 1.0,
    rescale: bool | None = None,
    rescale_norm: RescaleNorm = "l1",
    sign: str | None = None,
    tie_break: TieBreak = "sort",
    seed: int = 0,
    name: str = "",
) -> torch.Tensor:
    """One merged tensor (float32): ``base + combine(sparsify(d_i))``; DARE's masks from (seed, name, i)."""
    spec = get_method(spec) if isinstance(spec, str) else spec
    densities = [1.0] * len(deltas) if densities is None else densities
    trimmed = [
        sparsify(
            spec,
            d.float(),
            rho,
            rescale=rescale,
            rescale_norm=rescale_norm,
            tie_break=tie_break,
            generator=tensor_generator(seed, name, i) if spec.sparsification == "random" else None,
        )
        for i, (d, rho) in enumerate(zip(deltas, densities, strict=True))
    ]
    mixed = combine(spec, trimmed, weights, normalize=normalize, lambda_=lambda_, sign=sign, base=base)
    return base.float() + mixed
