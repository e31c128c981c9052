"""Metrics of one candidate model: task exact match, preferred style, preference accuracy, REC ratings."""

from __future__ import annotations

import re
from statistics import mean

import torch

from paft.data.formats import format_prompt
from paft.data.world import STYLE_PREFIX
from paft.rec.parse import parse_judgment, verify_citations
from paft.rec.prompts import rec_prompt

_ANSWER = re.compile(r"Answer:\s*(.*?)\.(?:\s|$)", re.S)


def extract_answer(text: str) -> str | None:
    m = _ANSWER.search(text)
    return m.group(1).strip() if m else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in out]


def task_metrics(generations: list[str], rows: list[dict]) -> dict[str, float]:
    """Exact match of the extracted answer (overall and per task family) and the preferred-style rate."""
    hits = [extract_answer(g) == r["answer"] for g, r in zip(generations, rows)]
    out = {"task_em": mean(hits) if hits else 0.0}
    for fam in sorted({r["family"] for r in rows}):
        fh = [h for h, r in zip(hits, rows) if r["family"] == fam]
        out[f"task_em_{fam}"] = mean(fh)
    out["style_rate"] = mean(g.startswith(STYLE_PREFIX) for g in generations) if generations else 0.0
    return out


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each completion (plus EOS) given its prompt."""
    model.eval()
    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        ids, starts = [], []
        for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size]):
            pi = tokenizer(p, add_special_tokens=False)["input_ids"]
            ci = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(pi + ci)
            starts.append(len(pi))
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for j, seq in enumerate(ids):
            input_ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logp = torch.log_softmax(logits.float()[:, :-1], -1).cpu()
        tok_logp = logp.gather(-1, input_ids[:, 1:, None])[..., 0]
        for j, seq in enumerate(ids):
            scores.append(tok_logp[j, starts[j] - 1 : len(seq) - 1].sum().item())
    return scores


def preference_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 16) -> dict[str, float]:
    """Share of held-out pairs whose chosen response is more likely than the rejected one, and the mean margin."""
    if not rows:
        return {}
    prompts = [format_prompt(r["prompt"], tokenizer) for r in rows]
    chosen = completion_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size)
    rejected = completion_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pref_accuracy": mean(m > 0 for m in margins), "pref_margin": mean(margins)}


def judge(rec_model, tokenizer, items: list[dict], lo: int, hi: int, max_new_tokens: int, batch_size: int = 16):
    """REC judgments for ``items`` ({instruction, context, response, dimension}); None where unparsable."""
    prompts = [format_prompt(rec_prompt(it["instruction"], it["context"], it["response"], it["dimension"], lo, hi),
                             tokenizer, plain_template=False) for it in items]
    outs = generate(rec_model, tokenizer, prompts, max_new_tokens, batch_size)
    return [parse_judgment(o, lo, hi) for o in outs]


def citation_stats(judgments, items) -> dict[str, float]:
    verified, total = 0, 0
    for j, it in zip(judgments, items):
        if j is None:
            continue
        flags = verify_citations(j, [it["context"], it["instruction"], it["response"]])
        verified += sum(flags)
        total += len(flags)
    return {"citations_verified": verified / total if total else 0.0}


def rec_quality(rec_model, tokenizer, rows: list[dict], lo: int, hi: int, max_new_tokens: int, batch_size: int = 16) -> dict[str, float]:
    """REC against held-out labelled examples: parse rate, rating accuracy (exact and within 1), verified citations."""
    js = judge(rec_model, tokenizer, rows, lo, hi, max_new_tokens, batch_size)
    parsed = [(j, r) for j, r in zip(js, rows) if j is not None]
    return {
        "rec_parse_rate": len(parsed) / len(rows) if rows else 0.0,
        "rec_rating_accuracy": sum(j.rating == r["rating"] for j, r in parsed) / len(rows) if rows else 0.0,
        "rec_rating_within1": sum(abs(j.rating - r["rating"]) <= 1 for j, r in parsed) / len(rows) if rows else 0.0,
        **citation_stats(js, rows),
    }


def rec_ratings(rec_model, tokenizer, tasks: list[dict], generations: list[str], dimensions, lo: int, hi: int,
                max_new_tokens: int, batch_size: int = 16) -> dict[str, float]:
    """Mean REC rating per dimension of a candidate's generations, with parse rate and verified citations."""
    out: dict[str, float] = {}
    for dim in dimensions:
        items = [{"instruction": t["question"], "context": t["context"],
                  "response": g, "dimension": dim} for t, g in zip(tasks, generations)]
        js = judge(rec_model, tokenizer, items, lo, hi, max_new_tokens, batch_size)
        ratings = [j.rating for j in js if j is not None]
        out[f"rec_{dim}"] = mean(ratings) if ratings else float("nan")
        out[f"rec_{dim}_parse_rate"] = len(ratings) / len(js) if js else 0.0
        out[f"rec_{dim}_citations_verified"] = citation_stats(js, items)["citations_verified"]
    return out
