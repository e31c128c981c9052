"""Merge search: the points tried, within the budget, reproducibly."""

from __future__ import annotations

import pytest

from paft.errors import PaftError
from paft.merge.search import SearchPoint, search_points

SPACE = {"methods": ["ties", "task_arithmetic", "dare_ties"], "densities": [0.2, 0.5], "weights": [[1, 1], [1, 0.5]]}


def test_grid_takes_the_whole_product_when_it_fits():
    points = search_points(**SPACE, budget=100)
    # task_arithmetic ignores density: once per weight pair
    assert len(points) == 2 * 2 + 2 + 2 * 2 == 10 and len(set(points)) == 10
    assert SearchPoint("task_arithmetic", 1.0, (1.0, 0.5)) in points
    assert {p.density for p in points if p.method == "ties"} == {0.2, 0.5}
    assert points[0].name == "ties-d0.2-w1-1"


def test_budget_bounds_and_seed_reproduces():
    for strategy in ("grid", "random"):
        a = search_points(**SPACE, budget=4, strategy=strategy, seed=3)
        assert len(a) == 4 and len(set(a)) == 4
        assert a == search_points(**SPACE, budget=4, strategy=strategy, seed=3)
        assert set(a) <= set(search_points(**SPACE, budget=100))
    others = {tuple(search_points(**SPACE, budget=4, strategy="random", seed=s)) for s in range(5)}
    assert len(others) > 1  # another seed, other points


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 0}, "budget"),
    ({"budget": 3, "strategy": "bayes"}, "strategy"),
    ({"budget": 3, "methods": ["nope"]}, "unknown merge method"),
    ({"budget": 3, "densities": [1.5]}, r"\(0, 1\]"),
    ({"budget": 3, "weights": []}, "at least one"),
])
def test_bad_search_space(kwargs, match):
    with pytest.raises(PaftError, match=match):
        search_points(**{**SPACE, **kwargs})
