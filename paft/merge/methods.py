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
- the top-k order among entries whose ``|delta|`` equals the k-th largest: ``tie_break="index"`` (default)
  keeps the lowest flat indices, found without sorting (:mod:`paft.merge.select`); ``"sort"`` takes
  mergekit's (the order of a full descending ``torch.argsort`` of ``|delta|`` as float32 on CPU, so the
  same torch build picks the same entries; mergekit on a GPU sorts there), at a full sort's cost;
- DARE draws its masks from a ``torch.Generator`` per (seed, input, tensor name, chunk of rows), so a seed
  reproduces a merge whatever the order or threads chunks run in (mergekit draws from torch's global RNG);
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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from paft.errors import PaftError
from paft.merge.select import chunks, magnitude_keys, top_k

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


def check_option(kind: str, value: str, known: Sequence[str]) -> str:
    if value not in known:
        raise PaftError(f"unknown {kind} {value!r}; known: {', '.join(known)}")
    return value


# ----------------------------------------------------------------------------- step 1: sparsify
def keep_count(numel: int, density: float) -> int:
    """mergekit ``sparsify.magnitude``: ``max(1, int(density * numel))`` entries (``density < 1``)."""
    return max(1, int(density * numel)) if numel else 0


def top_k_mask(delta: torch.Tensor, k: int, tie_break: TieBreak = "index") -> torch.Tensor:
    """Bool mask of the ``k`` entries of largest ``|delta|``.

    Entries above the k-th largest ``|delta|`` are always kept; among those equal to it (ties at the
    threshold, frequent in bf16 deltas, which take few distinct values) ``tie_break`` decides:
    ``"index"`` keeps the lowest flat indices (:mod:`paft.merge.select`, no sort); ``"sort"`` keeps
    mergekit's choice, the first of a full descending ``torch.argsort`` of ``|delta|`` as float32 (CPU).
    """
    check_option("tie_break", tie_break, TIE_BREAKS)
    flat = delta.detach().reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones(delta.shape, dtype=torch.bool)
    if tie_break == "sort":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.argsort(flat.abs().float(), descending=True)[:k]] = True
        return mask.view(delta.shape)
    spans = chunks(delta.shape)
    plan = top_k(lambda c: flat[spans[c][0]: spans[c][1]], spans, k, flat.dtype)
    return torch.cat([plan.mask(flat[s:e], c) for c, (s, e) in enumerate(spans)]).view(delta.shape)


def chunk_generator(seed: int, name: str, index: int, chunk: int) -> torch.Generator:
    """DARE's generator for one input's mask of one chunk of a tensor: a stable hash of (seed, input index,
    tensor name, chunk index), so a seed reproduces a merge whatever the order or threads chunks run in."""
    digest = hashlib.blake2b(f"{int(seed)}\0{int(index)}\0{name}\0{int(chunk)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def random_mask(numel: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (``U[0, 1) < density``)."""
    return torch.rand(numel, generator=generator, dtype=torch.float32) < density


# ----------------------------------------------------------------------------- steps 2-4
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
    With consensus (``sign``, default the method's; mergekit ``get_mask``): the elected sign of an entry is
    that of ``sum_i w_i d_i`` (``total``) or of ``sum_i sign(w_i d_i)`` (``frequency``), ``+`` when that is
    0; ``m = sum_i w_i d_i [agree_i]`` over the inputs whose weighted delta has the elected sign (zeros never
    agree), normalized per entry by ``sum_i w_i [agree_i]`` (left as is where that is 0). Then
    ``m *= lambda`` (after normalizing, as mergekit). ``linear`` without normalize is mergekit's
    ``sum_i w_i m_i`` with ``m_i = base + d_i``: it adds ``(sum_i w_i - 1) * base`` (needs ``base``);
    mergekit's linear has no ``lambda``, here it scales the difference from the base.

    The consensus is computed without bool tensors (on CPU a comparison or ``where`` costs several
    multiplications): the sums over the positive entries ``P = sum relu(w_i d_i)`` and the negative ones
    ``N``, with their weights ``Wp = sum w_i sign(relu(w_i d_i))`` and ``Wn``; ``e = 1`` where ``+`` is elected
    (``sign(votes) + 1`` clamped to 1), and the merge is ``e P + (1 - e) N`` over ``e Wp + (1 - e) Wn``:
    the same sums of the same terms as the masked sums.
    """
    normalize = spec.default_normalize if normalize is None else normalize
    consensus = sign_method(spec, sign)
    weights = [float(x) for x in weights]
    if consensus is None:
        merged = None
        for d, w in zip(deltas, weights, strict=True):
            wd = d.float() * w  # not add_(alpha=w): a fused multiply-add rounds otherwise than mergekit's sum
            merged = wd if merged is None else merged.add_(wd)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged /= total
        elif not normalize and spec.of_models and total != 1:
            if base is None:
                raise PaftError("linear without normalize scales the base by the sum of the weights: pass base")
            merged.add_(base.float(), alpha=total - 1)
    else:
        acc: list[torch.Tensor] | None = None
        for d, w in zip(deltas, weights, strict=True):
            wd = d.float() * w
            p, n = torch.relu(wd), wd.clamp_(max=0)
            terms = [p, n]
            if normalize or consensus == "count":
                sp, sn = torch.sign(p), torch.sign(n)  # 1 / -1 where the weighted entry is positive / negative
                if normalize:
                    terms += [sp * w, sn * -w]
                if consensus == "count":
                    terms.append(sp.add_(sn))
            acc = terms if acc is None else [x.add_(t) for x, t in zip(acc, terms, strict=True)]
        pos, neg = acc[0], acc[1]
        votes = pos + neg if consensus == "sum" else acc[-1]
        elected = torch.sign(votes).add_(1).clamp_(max=1)  # 1: "+" elected (also where the votes are 0)
        other = 1 - elected
        merged = pos.mul_(elected).add_(neg.mul_(other))
        if normalize:
            divisor = acc[2].mul_(elected).add_(acc[3].mul_(other))
            zero = 1 - torch.sign(divisor.abs())
            merged /= divisor.add_(zero)  # a divisor of 0 (no input agrees) counts as 1
    return merged.mul_(lambda_) if lambda_ != 1 else merged


# ----------------------------------------------------------------------------- one tensor
@dataclass(frozen=True)
class Options:
    """A merge's options, resolved against the method (see :func:`resolve`)."""

    spec: MethodSpec
    normalize: bool
    lambda_: float
    rescale_norm: RescaleNorm | None  # None: kept entries are not scaled up
    consensus: Consensus | None
    tie_break: TieBreak
    seed: int


def resolve(
    method: str | MethodSpec,
    *,
    normalize: bool | None = None,
    lambda_: float = 1.0,
    rescale: bool | None = None,
    rescale_norm: RescaleNorm = "l1",
    sign: str | None = None,
    tie_break: TieBreak = "index",
    seed: int = 0,
) -> Options:
    """Check the options and fill the method's defaults (``normalize``, ``rescale``, sign)."""
    spec = get_method(method) if isinstance(method, str) else method
    check_option("rescale norm", rescale_norm, RESCALE_NORMS)
    check_option("tie_break", tie_break, TIE_BREAKS)
    rescale = spec.default_rescale if rescale is None else bool(rescale)
    return Options(
        spec,
        spec.default_normalize if normalize is None else bool(normalize),
        float(lambda_),
        rescale_norm if rescale and spec.sparsification else None,
        sign_method(spec, sign),
        tie_break,
        int(seed),
    )


Run = Callable[[Callable[[int], object], int], list]


def serial(f: Callable[[int], object], n: int) -> list:
    return [f(c) for c in range(n)]


class NonFinite(PaftError):
    """An inf or NaN in input ``index``'s delta (None: in the merge, from the base or an overflow)."""

    def __init__(self, index: int | None):
        super().__init__(f"input {index} has non-finite values" if index is not None else "non-finite merge")
        self.index = index


@dataclass(frozen=True)
class LazyDelta:
    """A delta computed when read, chunk by chunk (``read(start, end)``: its flat entries ``start:end``),
    never held whole; ``delta[s:e]`` reads."""

    read: Callable[[int, int], torch.Tensor]
    size: int
    dtype: torch.dtype

    def __getitem__(self, span: slice) -> torch.Tensor:
        return self.read(span.start, span.stop)

    def numel(self) -> int:
        return self.size


def merge_into(
    out: torch.Tensor,
    opts: Options,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor | LazyDelta | None],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    name: str = "",
    run: Run = serial,
    stats: list[dict] | None = None,
) -> torch.Tensor:
    """``out = base + combine(sparsify(d_i))`` (rounded to ``out``'s dtype), chunk by chunk.

    ``deltas[i]`` is None where input ``i`` leaves the tensor as the base (a zero delta), a :class:`LazyDelta`
    to compute it chunk by chunk (read twice by magnitude plans and ``l1`` rescaling); ``run(f, n)`` maps
    the per-chunk work over chunks (``serial``, or threads: chunks are independent). Step 1 for one input
    (see the module docstring): ``magnitude`` plans its top-k over the whole tensor first
    (:func:`paft.merge.select.top_k`, or a full sort for ``tie_break="sort"``); ``random`` draws each
    chunk's mask from :func:`chunk_generator`; ``l1`` rescaling sums ``|d|`` and ``|kept|`` over the whole
    tensor first. ``stats[i]`` (if given) accumulates ``tensors``, ``params``, ``nonzero`` (entries of the
    delta) and ``kept`` (nonzero after step 1). Raises :class:`NonFinite` for an input whose delta has an
    inf or NaN.
    """
    spec = opts.spec
    spans = chunks(base.shape)
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    flat = [d.reshape(-1) if isinstance(d, torch.Tensor) else d for d in deltas]
    # per input: (chunk as stored, chunk index) -> the chunk with dropped entries zeroed (None: keep all)
    trims: list[Callable[[torch.Tensor, int], torch.Tensor] | None] = []
    counted: list[tuple[int, int] | None] = []  # (nonzero, kept) when known without counting chunk by chunk
    for i, (d, rho) in enumerate(zip(flat, densities, strict=True)):
        counted.append(None)
        if d is None or spec.sparsification is None or rho >= 1:
            trims.append(None)
        elif spec.sparsification == "random":
            trims.append(
                lambda x, c, i=i, rho=rho: x * random_mask(x.numel(), rho, chunk_generator(opts.seed, name, i, c))
            )
        else:
            k = keep_count(d.numel(), rho)
            plan = top_k(lambda c, d=d: d[spans[c][0]: spans[c][1]], spans, k, d.dtype, run)
            if plan.nonfinite:
                raise NonFinite(i)
            nonzero = d.numel() - plan.zeros
            counted[i] = (nonzero, k if plan.threshold > 0 else nonzero)
            if opts.tie_break == "sort":
                whole = d if isinstance(d, torch.Tensor) else torch.cat([d[a:b] for a, b in spans])
                full = top_k_mask(whole, k, "sort")
                trims.append(lambda x, c, full=full: x * full[spans[c][0]: spans[c][1]])
            else:
                trims.append(plan.apply)
    scales = []
    for d, trim, rho in zip(flat, trims, densities, strict=True):
        if trim is None or opts.rescale_norm is None:
            scales.append(1.0)
        elif opts.rescale_norm == "density":
            scales.append(1.0 / rho)
        else:  # l1: mergekit's rescaled_masked_tensor (unscaled where either norm is below 1e-7)
            def sums(c, d=d, trim=trim):
                x = d[spans[c][0]: spans[c][1]]
                return float(x.float().abs().sum()), float(trim(x, c).float().abs().sum())
            parts = run(sums, len(spans))
            before, after = sum(p[0] for p in parts), sum(p[1] for p in parts)
            scales.append(1.0 if before < 1e-7 or after < 1e-7 else before / after)
    # inf / NaN: a magnitude plan sees them, DARE may drop them (each chunk's sum is checked), and whatever
    # reaches the merge is caught in its chunk's sum
    check_each = spec.sparsification == "random"

    def chunk(c: int) -> list[tuple[int, int]]:
        s, e = spans[c]
        trimmed, counts = [], []
        for i, (d, trim, scale) in enumerate(zip(flat, trims, scales, strict=True)):
            if d is None:
                trimmed.append(torch.zeros(e - s))
                counts.append((0, 0))
                continue
            x = d[s:e]
            if check_each and not math.isfinite(float(x.float().sum())):
                _check_finite(x, i)
            y = x.float() if trim is None else trim(x, c).float()
            if scale != 1.0:
                y *= scale
            trimmed.append(y)
            if stats is not None and counted[i] is None:  # nonzero keys: on integers, several times faster
                nz = int(torch.count_nonzero(magnitude_keys(x)))
                counts.append((nz, nz if trim is None else int(torch.count_nonzero(magnitude_keys(y)))))
            else:
                counts.append((0, 0))
        b = flat_base[s:e]
        mixed = combine(spec, trimmed, weights, normalize=opts.normalize, lambda_=opts.lambda_,
                        sign=opts.consensus, base=b)
        merged = mixed.add_(b.float())
        if not math.isfinite(float(merged.sum())) and not bool(torch.isfinite(merged).all()):
            for i, d in enumerate(flat):
                if d is not None:
                    _check_finite(d[s:e], i)
            raise NonFinite(None)  # the base's entries, or the merge overflows
        flat_out[s:e] = merged
        return counts

    results = run(chunk, len(spans))
    if stats is not None:
        for i, d in enumerate(flat):
            if d is None:
                continue
            nonzero, kept = counted[i] or (sum(r[i][0] for r in results), sum(r[i][1] for r in results))
            st = stats[i]
            st["tensors"] += 1
            st["params"] += d.numel()
            st["nonzero"] += nonzero
            st["kept"] += kept
    return out


def _check_finite(x: torch.Tensor, index: int) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFinite(index)


def merge_tensor(
    spec: MethodSpec | str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    name: str = "",
    **options,
) -> torch.Tensor:
    """One merged tensor (float32): ``base + combine(sparsify(d_i))``; ``options`` as :func:`resolve`."""
    opts = resolve(spec, **options)
    densities = [1.0] * len(deltas) if densities is None else densities
    out = torch.empty(base.shape, dtype=torch.float32)
    return merge_into(out, opts, base, deltas, weights, densities, name=name)
