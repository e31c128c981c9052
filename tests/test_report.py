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


def test_score_sparsity_and_verdict():
    from paft.evaluate.report import score_label, verdict, with_score, with_sparsity

    results = {
        "sft": {"task_em": 0.6, "pref_accuracy": 0.4},
        "sequential": {"task_em": 0.2, "pref_accuracy": 0.9},
        "paft_ties": {"task_em": 0.5, "pref_accuracy": 0.9},
        "paft_task_arithmetic": {"task_em": 0.6, "pref_accuracy": 1.0},
        "paft_broken": {"task_em": 0.9},  # no pref_accuracy: no score
        "rec": {"rec_parse_rate": 1.0},
    }
    weights = {"task_em": 2.0, "pref_accuracy": 1.0}
    scored = with_score(results, weights)
    assert scored["paft_ties"]["score"] == pytest.approx(1.9) and "score" not in scored["paft_broken"]
    assert "score" not in scored["rec"] and "score" not in results["sft"]
    assert score_label(weights) == "score = 2·task_em + 1·pref_accuracy"
    sparse = with_sparsity(scored, {"sft": {"share_rel": 0.1}, "paft_ties": {"share_rel": 0.5}, "gone": {"share_rel": 1}})
    assert sparse["paft_ties"]["delta_sparsity"] == 0.5 and "gone" not in sparse and "delta_sparsity" not in sparse["sequential"]
    v = verdict(scored)
    assert v["beat"] and v["paft"] == "paft_task_arithmetic" and v["first"] == "paft_ties"
    assert v["delta"] == pytest.approx({"score": 0.9, "task_em": 0.4, "pref_accuracy": 0.1})
    assert v["text"].startswith("PAFT beat sequential training. Best PAFT candidate: paft_task_arithmetic beat "
                                "sequential on score: 2.200 vs 1.300 (+0.900)")
    assert "The first PAFT merge, paft_ties beat sequential on score: 1.900 vs 1.300" in v["text"]
    worse = with_score({**results, "sequential": {"task_em": 0.9, "pref_accuracy": 1.0}}, weights)
    assert not verdict(worse)["beat"] and "did not beat" in verdict(worse)["text"]
    assert verdict(with_score({"paft_ties": {"task_em": 1, "pref_accuracy": 1}}, weights)) is None  # no sequential row


def test_harness_metrics_get_columns_and_rec_rows_their_own_table():
    results = {"sft": {"task_em": 0.5, "harness_arc_challenge_acc": 0.25}, "rec": {"rec_parse_rate": 1.0}}
    table = results_table(results)
    assert table.splitlines()[0] == "| candidate | task_em | harness_arc_challenge_acc |"
    assert "| held-out | 1.000 |" in table
    assert "held-out" not in results_table(results, rec=False)


def test_merge_plan_names_and_candidate_selection(tmp_path):
    from paft.config import load_params
    from paft.evaluate.candidates import merge_name, merge_plan, selected
    from tests.conftest import write_params

    assert merge_name("ties", "sft", "align") == "paft_ties"
    assert merge_name("dare_ties", "sft_l1", "orpo") == "paft_dare_ties_l1_orpo"
    assert merge_name("ties", "sparse", "align") == "paft_ties_sparse"
    p = load_params(write_params(tmp_path, {"train": {"variants": {"sft_l1": {"from": "sft"}, "orpo": {"from": "align"}}},
                                            "merge": {"methods": ["ties", "linear"], "sft": ["sft", "sft_l1"],
                                                      "align": ["align", "orpo"]},
                                            "evaluate": {"candidates": ["base", "paft_*_l1*"]}}))
    plan = merge_plan(p)
    assert len(plan) == 8 and next(iter(plan)) == "paft_ties" and plan["paft_linear_l1_orpo"] == ("linear", "sft_l1", "orpo")
    cands = [{"name": n} for n in ("base", "sft", *plan)]
    assert [c["name"] for c in selected(p, cands)] == ["base", "paft_ties_l1", "paft_linear_l1", "paft_ties_l1_orpo",
                                                       "paft_linear_l1_orpo"]


def test_harness_include_jsonl_files_are_checked_before_any_work(tmp_path):
    from paft.config import load_params
    from paft.errors import ConfigError, PaftError
    from paft.evaluate.candidates import harness_includes
    from tests.conftest import write_params

    good = tmp_path / "world_mc.jsonl"
    good.write_text('{"question": "1+1?", "choices": ["2", "3"], "answer": 0}\n')
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "1+1?", "choices": ["2", "3"], "answer": 0}\n{"question": "x"}\n')
    folder = tmp_path / "yaml_tasks"
    folder.mkdir()
    p = load_params(write_params(tmp_path, {"evaluate": {"harness_include": ["world_mc.jsonl", "yaml_tasks"]}}))
    assert harness_includes(p) == [folder]  # checked only: nothing written
    assert not (tmp_path / "out").exists()
    made = harness_includes(p, tmp_path / "out")
    assert made == [tmp_path / "out" / "world_mc", folder] and (tmp_path / "out" / "world_mc" / "world_mc.yaml").is_file()
    with pytest.raises(PaftError, match=rf"{bad}:2: missing field 'choices'"):
        harness_includes(load_params(write_params(tmp_path, {"evaluate": {"harness_include": ["broken.jsonl"]}})))
    with pytest.raises(ConfigError, match="neither a folder of task YAMLs nor a .jsonl file"):
        harness_includes(load_params(write_params(tmp_path, {"evaluate": {"harness_include": ["nothing"]}})))
