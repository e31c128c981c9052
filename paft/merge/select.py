"""Top-k by magnitude without sorting: an exact radix select on the bits of ``|delta|``.

The bit pattern of a non-negative IEEE float, read as an integer, orders as the float does. So ``|x|``'s key is
the pattern with the sign bit cleared (15 bits for bf16 / fp16, 31 for float32), and the k-th largest key is
found from histograms: bf16 / fp16 in one pass (2^15 bins), float32 in two (the high 15 bits, then the low 16
among the entries in the chosen high bucket). Entries above the threshold key are kept; of those equal to it,
the lowest flat indices, as many as ``k`` still needs. Work is split in row-aligned chunks (:func:`chunks`)
that threads process independently: each chunk's histogram is kept, so the chunk's share of the threshold
ties is known without another pass.

Cost: a histogram pass per level and a compare per entry when masking, against mergekit's full argsort
(``O(n log n)``, single-threaded on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

CHUNK = 1 << 18  # entries per chunk: fits a core's cache with the few temporaries a merge step makes

_KEYS = {  # dtype -> (same-size int dtype, mask of the magnitude bits, first non-finite key)
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}


def chunks(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Flat ``[start, end)`` ranges covering a tensor in whole rows (of its first dimension), about
    :data:`CHUNK` entries each (at least one row)."""
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return []
    if not shape:
        return [(0, 1)]
    row = n // shape[0] if len(shape) > 1 else 1
    step = max(1, CHUNK // row) * row
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys (int16 for 16-bit floats, else int32) ordering as ``|x|`` does (float64: as float32)."""
    if x.dtype not in _KEYS:
        x = x.float()
    int_dtype, mask, _ = _KEYS[x.dtype]
    return x.view(int_dtype) & mask


def nonfinite_key(dtype: torch.dtype) -> int:
    """The smallest key of an infinite or NaN value of ``dtype`` (keys are :func:`magnitude_keys`)."""
    return _KEYS.get(dtype, _KEYS[torch.float32])[2]


def _two_levels(dtype: torch.dtype) -> bool:
    return dtype not in (torch.bfloat16, torch.float16)


@dataclass
class TopK:
    """Which entries of a tensor the top-k keeps: keys above ``threshold``, plus ``quota[c]`` of chunk ``c``'s
    entries equal to it (lowest index first; ``ties[c]`` is how many chunk ``c`` has)."""

    threshold: int
    quota: list[int]
    ties: list[int]
    zeros: int  # entries that are 0
    nonfinite: bool  # some entry is inf or NaN (caller reports it)

    def mask(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Bool mask of the kept entries of chunk ``c`` (its entries ``x``, flat)."""
        keys = magnitude_keys(x)
        mask = keys > self.threshold
        mask[torch.nonzero(keys == self.threshold).reshape(-1)[: self.quota[c]]] = True
        return mask

    def apply(self, x: torch.Tensor, c: int) -> torch.Tensor:
        """Chunk ``c`` (its entries ``x``, flat, as planned) with the dropped entries zeroed.

        Integer arithmetic on the bit patterns (``keys - threshold`` clamped to 0/1 multiplies the bits):
        comparisons and ``where`` produce bool tensors, several times slower on CPU."""
        if x.dtype not in _KEYS:
            x = x.float()
        bits = x.view(_KEYS[x.dtype][0])
        keys = bits & _KEYS[x.dtype][1]
        q = self.quota[c]
        if q == 0 or q == self.ties[c]:  # keys > threshold, or >= it (all ties of the chunk kept)
            keep = (keys - (self.threshold if q == 0 else self.threshold - 1)).clamp_(0, 1)
        else:
            keep = (keys > self.threshold).to(bits.dtype)
            keep[torch.nonzero(keys == self.threshold).reshape(-1)[:q]] = 1
        return (bits * keep).view(x.dtype)


def top_k(
    read: Callable[[int], torch.Tensor],
    spans: list[tuple[int, int]],
    k: int,
    dtype: torch.dtype,
    run: Callable[[Callable[[int], object], int], list] = lambda f, n: [f(c) for c in range(n)],
) -> TopK:
    """Plan the top-``k`` by magnitude of a tensor given chunk by chunk: ``read(c)`` returns chunk ``c``
    (flat, ``spans[c]`` its range) and ``run(f, n)`` maps ``f`` over chunks ``0..n-1`` (e.g. on threads)."""
    n = len(spans)
    two = _two_levels(dtype)
    bins = 1 << 15

    def level1(c: int) -> tuple[torch.Tensor, int]:
        keys = magnitude_keys(read(c))
        if not two:  # int16 keys are non-negative: bin 0 counts the zeros
            return torch.bincount(keys, minlength=bins), 0
        return torch.bincount(keys >> 16, minlength=bins), keys.numel() - int(torch.count_nonzero(keys))

    results = run(level1, n)
    total = torch.stack([h for h, _ in results]).sum(0) if n else torch.zeros(bins, dtype=torch.int64)
    zeros = int(total[0]) if not two else sum(z for _, z in results)
    nonfinite = bool(total[(nonfinite_key(dtype) >> 16) if two else nonfinite_key(dtype):].sum())
    bucket, above = _kth_bucket(total, k)
    if two:  # the low 16 bits, among the entries of the chosen high bucket
        def level2(c: int) -> torch.Tensor:
            keys = magnitude_keys(read(c))
            return torch.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16)

        hists = run(level2, n) if n else []
        low, above2 = _kth_bucket(torch.stack(hists).sum(0), k - above)
        threshold, above = (bucket << 16) | low, above + above2
        ties = [int(h[low]) for h in hists]
    else:
        threshold = bucket
        ties = [int(h[bucket]) for h, _ in results]
    need, quota = k - above, []
    for t in ties:
        quota.append(min(t, need))
        need -= quota[-1]
    return TopK(threshold, quota, ties, zeros, nonfinite)


def _kth_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest key (1-based) and how many keys lie in buckets above it."""
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))  # first position where the count from the top reaches k
    i = min(i, hist.numel() - 1)
    return hist.numel() - 1 - i, int(from_top[i - 1]) if i > 0 else 0
