"""The results table: one row per candidate, the metrics people compare."""

from __future__ import annotations

import math

COLUMNS = ("task_em", "style_rate", "pref_accuracy", "pref_margin", "tax_task_em", "tax_style_rate",
           "tax_pref_accuracy", "rec_faithfulness", "rec_instruction_following", "rec_coherence", "rec_completeness")
# the single-stage models (one kind of fine-tuning each) the alignment tax is measured against
SINGLE_STAGE = ("sft", "align", "dpo", "orpo")
TAXED = ("task_em", "style_rate", "pref_accuracy")
REC_COLUMNS = ("rec_parse_rate", "rec_rating_accuracy", "rec_rating_within1", "rec_faithfulness_balanced_accuracy",
               "rec_spearman", "rec_citations_verified", "rec_citation_f1", "rec_pair_accuracy",
               "rec_pair_position_consistency", "rec_rag_attribution_f1", "rec_injection_flip_rate", "rec_injection_top_rate", "rec_latency_s")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.3f}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def with_alignment_tax(results: dict[str, dict]) -> dict[str, dict]:
    """``tax_<metric>`` for every candidate: the best single-stage model's ``metric`` minus the candidate's.

    The alignment tax of PAFT's paper: what a model combining SFT and alignment (sequential, or a merge)
    loses against the best model trained for one of them alone; 0 or below means none paid. Candidates
    without the metric, and every metric no single-stage model has, get no tax.
    """
    out = {k: dict(v) for k, v in results.items()}
    for metric in TAXED:
        best = [r[metric] for name, r in results.items() if name in SINGLE_STAGE and metric in r]
        if not best:
            continue
        for name, r in out.items():
            if not name.startswith("rec") and metric in r:
                r[f"tax_{metric}"] = max(best) - r[metric]
    return out


def results_table(results: dict[str, dict]) -> str:
    """Markdown: candidates × metrics, then the REC evaluator's own quality."""
    cands = {k: v for k, v in results.items() if not k.startswith("rec")}
    recs = {k: v for k, v in results.items() if k.startswith("rec")}  # rec: synthetic held-out; rec_<set>: real sets
    cols = [c for c in COLUMNS if any(c in r for r in cands.values())]
    out = _table(["candidate", *cols], [[name, *(_fmt(r.get(c)) for c in cols)] for name, r in cands.items()])
    if recs:
        rcols = [c for c in REC_COLUMNS if any(c in r for r in recs.values())]
        out += "\n\n" + _table(["REC evaluator on", *(c[len("rec_"):] for c in rcols)],
                                [[("held-out" if k == "rec" else k[len("rec_"):]), *(_fmt(r.get(c)) for c in rcols)]
                                 for k, r in recs.items()])
    return out
