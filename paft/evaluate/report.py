"""The results table: one row per candidate, the metrics people compare."""

from __future__ import annotations

import math

COLUMNS = ("score", "task_em", "style_rate", "pref_accuracy", "pref_margin", "pref_reward_accuracy", "task_loss",
           "sft_loss", "tax_task_em", "tax_style_rate", "tax_pref_accuracy", "rec_faithfulness",
           "rec_instruction_following", "rec_coherence", "rec_completeness", "rec_citations_verified", "delta_sparsity")
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


def with_alignment_tax(results: dict[str, dict], single_stage=SINGLE_STAGE) -> dict[str, dict]:
    """``tax_<metric>`` for every candidate: the best single-stage model's ``metric`` minus the candidate's.

    ``single_stage``: the names of the single-stage models (the training jobs of the fan-out).
    The alignment tax of PAFT's paper: what a model combining SFT and alignment (sequential, or a merge)
    loses against the best model trained for one of them alone; 0 or below means none paid. Candidates
    without the metric, and every metric no single-stage model has, get no tax.
    """
    out = {k: dict(v) for k, v in results.items()}
    for metric in TAXED:
        best = [r[metric] for name, r in results.items() if name in single_stage and metric in r]
        if not best:
            continue
        for name, r in out.items():
            if not name.startswith("rec") and metric in r:
                r[f"tax_{metric}"] = max(best) - r[metric]
    return out


def with_sparsity(results: dict[str, dict], overall: dict[str, dict]) -> dict[str, dict]:
    """``delta_sparsity`` for every candidate the sparsity step measured: the share of its delta's entries with
    |δ| ≤ eps_rel × mean|W| of the base tensor (``share_rel`` of paft.train.sparsity)."""
    out = {k: dict(v) for k, v in results.items()}
    for name, o in overall.items():
        if name in out and o.get("share_rel") is not None:
            out[name]["delta_sparsity"] = o["share_rel"]
    return out


def score_label(weights: dict[str, float]) -> str:
    """``score = 1·task_em + 1·pref_accuracy``: what ``evaluate.score`` computes."""
    return "score = " + " + ".join(f"{w:g}·{m}" for m, w in weights.items())


def with_score(results: dict[str, dict], weights: dict[str, float]) -> dict[str, dict]:
    """``score`` (the sum of weight × metric of ``evaluate.score``) for every candidate that has all its metrics."""
    out = {k: dict(v) for k, v in results.items()}
    for name, r in out.items():
        if not name.startswith("rec") and all(m in r for m in weights):
            r["score"] = sum(w * r[m] for m, w in weights.items())
    return out


def results_table(results: dict[str, dict], rec: bool = True) -> str:
    """Markdown: candidates × metrics (``COLUMNS``, then any lm-evaluation-harness metric), then (``rec``) the
    REC evaluator's own quality."""
    cands = {k: v for k, v in results.items() if not k.startswith("rec")}
    harness = sorted({c for r in cands.values() for c in r if c.startswith("harness_")})
    cols = [c for c in (*COLUMNS, *harness) if any(c in r for r in cands.values())]
    out = _table(["candidate", *cols], [[name, *(_fmt(r.get(c)) for c in cols)] for name, r in cands.items()])
    return out + ("\n\n" + rec_table(results) if rec and any(k.startswith("rec") for k in results) else "")


def rec_table(results: dict[str, dict]) -> str:
    """Markdown: the REC evaluator's quality on each held-out set (rec: synthetic; rec_<set>: real sets)."""
    recs = {k: v for k, v in results.items() if k.startswith("rec")}
    rcols = [c for c in REC_COLUMNS if any(c in r for r in recs.values())]
    return _table(["REC evaluator on", *(c[len("rec_"):] for c in rcols)],
                  [[("held-out" if k == "rec" else k[len("rec_"):]), *(_fmt(r.get(c)) for c in rcols)]
                   for k, r in recs.items()])


def verdict(results: dict[str, dict], metric: str = "score", details=("task_em", "pref_accuracy")) -> dict | None:
    """Did PAFT beat sequential training (SFT, then alignment)? The first PAFT merge (chosen before seeing the
    results) and the best PAFT candidate (merges and the search's best, chosen on the same held-out sets) against
    ``sequential`` on ``metric``; None without a sequential row or a PAFT row with the metric."""
    seq = results.get("sequential", {})
    paft = [n for n, r in results.items() if n.startswith("paft_") and metric in r]
    if metric not in seq or not paft:
        return None
    best = max(paft, key=lambda n: results[n][metric])

    def compare(name: str) -> tuple[str, dict]:
        r = results[name]
        delta = {m: r[m] - seq[m] for m in (metric, *details) if m in r and m in seq}
        d = delta[metric]
        word = "beat" if d > 0 else "tied with" if d == 0 else "lost to"
        more = "; ".join(f"{m} {r[m]:.3f} vs {seq[m]:.3f} ({delta[m]:+.3f})" for m in details if m in delta)
        return f"{name} {word} sequential on {metric}: {r[metric]:.3f} vs {seq[metric]:.3f} ({d:+.3f}); {more}", delta

    first = paft[0]
    text, delta = compare(best)
    if first != best:
        text = f"{text}. The first PAFT merge, {compare(first)[0]}"
    beat = delta[metric] > 0
    return {"text": f"PAFT {'beat' if beat else 'did not beat'} sequential training. Best PAFT candidate: {text}.",
            "paft": best, "first": first, "sequential": "sequential", "beat": beat, "delta": delta}
