"""Merge methods, declared as data (mergekit's "generalized task arithmetic" family).

Every method merges per tensor, from the base tensor and one delta (task vector) per input:

1. *sparsify* each delta on its own (``sparsification``; ``density`` is the share kept);
2. weight it: ``wd_i = w_i * d_i``;
3. *consensus* (``consensus``): elect a sign per entry and keep only the entries that agree with it;
4. sum; with ``normalize`` divide by the sum of the weights that contributed (per entry with a consensus,
   else the sum of all weights); multiply by ``lambda``; add to the base.

This follows ``mergekit/merge_methods/generalized_task_arithmetic.py`` (GTATask.execute, get_mask) and
``mergekit/sparsify.py`` (magnitude); see :func:`combine` for the formula and the few deviations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from paft.errors import PaftError

Sparsification = Literal["magnitude"]
Consensus = Literal["sum", "count"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    sparsification: Sparsification | None  # how each delta is trimmed to ``density`` (None: density unused)
    consensus: Consensus | None  # how the sign per entry is elected (None: no sign election)
    default_normalize: bool  # divide by the (contributing) weights unless the caller says otherwise
    reference: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # mergekit "linear" averages whole models: sum_i w_i * m_i / sum_i w_i. With every m_i = base + d_i
        # and the base not among the inputs, that is base + sum_i w_i d_i / sum_i w_i: normalized task arithmetic.
        MethodSpec("linear", None, None, True, "https://arxiv.org/abs/2203.05482"),
        MethodSpec("task_arithmetic", None, None, False, "https://arxiv.org/abs/2212.04089"),
        MethodSpec("ties", "magnitude", "sum", True, "https://arxiv.org/abs/2306.01708"),
    )
}


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise PaftError(f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


# ----------------------------------------------------------------------------- step 1: sparsify
def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k = int(density * numel)`` entries of largest ``|delta|``, zero the rest.

    mergekit ``sparsify.magnitude`` (no rescaling). Ties in ``|delta|`` at the cut are broken by
    ``torch.topk``'s order (mergekit uses ``argsort``; both are unspecified among equal values).
    Deviation: ``k == 0`` gives an all-zero delta where mergekit asserts.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    out = torch.zeros_like(delta)
    if k > 0:
        flat = delta.reshape(-1)
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        out.view(-1)[idx] = flat[idx]
    return out


SPARSIFIERS = {"magnitude": magnitude}


def sparsify(spec: MethodSpec, delta: torch.Tensor, density: float) -> torch.Tensor:
    """Step 1 for one input's delta (unchanged if the method does not sparsify)."""
    if spec.sparsification is None:
        return delta
    return SPARSIFIERS[spec.sparsification](delta, density)


# ----------------------------------------------------------------------------- steps 2-4
def sign_mask(weighted: torch.Tensor, method: Consensus) -> torch.Tensor:
    """mergekit ``get_mask``: True where an input's weighted delta has the elected sign.

    ``sum``: elected sign = sign of the sum of weighted deltas ("total" mass, the TIES paper);
    ``count``: sign of the sum of signs. A zero total elects ``+``. Zero entries never agree.
    """
    sign = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return sign == elected


def combine(
    spec: MethodSpec,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool | None = None,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """Steps 2-4 on already sparsified deltas (one per input, same shape): the merged delta.

    Without consensus: ``m = sum_i w_i d_i``, normalized by ``sum_i w_i`` (left as is when ``|sum| < 1e-8``).
    With consensus: ``m = sum_i w_i d_i [agree_i]``, normalized per entry by ``sum_i w_i [agree_i]``
    (left as is where that is 0). Then ``m *= lambda`` (mergekit applies ``lambda`` after normalizing).
    """
    normalize = spec.default_normalize if normalize is None else normalize
    stacked = torch.stack([d.float() for d in deltas])
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if spec.consensus is not None:
        mask = sign_mask(weighted, spec.consensus).to(stacked.dtype)
        merged = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        merged = merged / divisor
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
) -> torch.Tensor:
    """One merged tensor (float32): ``base + combine(sparsify(d_i))``."""
    spec = get_method(spec) if isinstance(spec, str) else spec
    densities = [1.0] * len(deltas) if densities is None else densities
    trimmed = [sparsify(spec, d.float(), rho) for d, rho in zip(deltas, densities, strict=True)]
    return base.float() + combine(spec, trimmed, weights, normalize=normalize, lambda_=lambda_)
