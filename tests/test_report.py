"""The results table's alignment tax: each candidate against the best single-stage model."""

from __future__ import annotations

import pytest

from paft.evaluate.report import results_table, with_alignment_tax


def test_alignment_tax_against_the_best_single_stage_model():
    results = {
        "base": {"task_em": 0.1, "pref_accuracy": 0.5},
        "sft": {"task_em": 0.6, "pref_accuracy": 0.4},
        "align": {"task_em": 0.2, "pref_accuracy": 0.9},
        "sequential": {"task_em": 0.3, "pref_accuracy": 0.8},
        "paft_ties": {"task_em": 0.65, "pref_accuracy": 0.7},
        "rec": {"rec_parse_rate": 1.0},
    }
    taxed = with_alignment_tax(results)
    assert taxed["sequential"]["tax_task_em"] == pytest.approx(0.3)  # vs SFT's skill
    assert taxed["sequential"]["tax_pref_accuracy"] == pytest.approx(0.1)  # vs alignment's preference
    assert taxed["paft_ties"]["tax_task_em"] == pytest.approx(-0.05)  # better than both: no tax paid
    assert taxed["sft"]["tax_task_em"] == 0 and taxed["align"]["tax_pref_accuracy"] == 0
    assert "tax_style_rate" not in taxed["sft"]  # no single-stage model has the metric
    assert "tax_task_em" not in taxed["rec"] and "tax_task_em" not in results["sft"]  # input left as it was
    table = results_table(taxed)
    header = table.splitlines()[0]
    assert "tax_task_em" in header and "tax_pref_accuracy" in header
    assert "| paft_ties | 0.650 | 0.700 | -0.050 | 0.200 |" in table  # keeps skill, pays on preference


def test_no_single_stage_model_no_tax():
    assert with_alignment_tax({"base": {"task_em": 0.1}}) == {"base": {"task_em": 0.1}}
