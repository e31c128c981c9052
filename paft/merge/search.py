"""Merge search: which merges to try, within a budget (the flow merges, scores and logs each as a child run).

A search space is the product of methods × densities × weight pairs (SFT weight, alignment weight). A ``grid``
search takes the whole product when it fits the budget; otherwise, and for ``random``, a seeded sample of
``budget`` distinct points, so a rerun with the same seed tries the same merges. Methods that do not sparsify
(``linear``, ``task_arithmetic``) ignore density: they appear once per weight pair, not once per density.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from paft.errors import PaftError
from paft.merge.methods import get_method


@dataclass(frozen=True)
class SearchPoint:
    method: str
    density: float
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        """A run name: ``ties-d0.2-w1.0-0.5``."""
        return f"{self.method}-d{self.density:g}-w" + "-".join(f"{w:g}" for w in self.weights)


def search_points(
    methods: Sequence[str],
    densities: Sequence[float],
    weights: Sequence[Sequence[float]],
    *,
    budget: int,
    strategy: Literal["grid", "random"] = "grid",
    seed: int = 0,
) -> list[SearchPoint]:
    """The merges to try (at most ``budget``), in a stable order (see the module docstring)."""
    if budget < 1:
        raise PaftError(f"merge search budget must be at least 1, got {budget}")
    if strategy not in ("grid", "random"):
        raise PaftError(f"unknown merge search strategy {strategy!r}; known: grid, random")
    if not methods or not densities or not weights:
        raise PaftError("merge search needs at least one method, one density and one weight list")
    for d in densities:
        if not 0 < d <= 1:
            raise PaftError(f"merge search density must be in (0, 1], got {d}")
    points: list[SearchPoint] = []
    for method, w in itertools.product(methods, weights):
        spec = get_method(method)  # unknown methods fail here, naming the known ones
        for d in densities if spec.sparsification else [1.0]:
            point = SearchPoint(method, float(d), tuple(float(x) for x in w))
            if point not in points:
                points.append(point)
    if strategy == "grid" and len(points) <= budget:
        return points
    chosen = sorted(random.Random(seed).sample(range(len(points)), min(budget, len(points))))
    return [points[i] for i in chosen]
