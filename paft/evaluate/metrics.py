"""Metrics of one candidate model: task exact match, preferred style, preference accuracy, REC ratings."""

from __future__ import annotations

import re
from statistics import mean

import torch

from paft.data.formats import format_prompt
from paft.data.world import STYLE_PREFIX

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
def completion_scores(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Sum of log-probabilities of each completion (plus EOS) given its prompt, and its number of tokens."""
    model.eval()
    scores: list[float] = []
    counts: list[int] = []
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
            counts.append(len(seq) - starts[j])
    return scores, counts


def completion_logprobs(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each completion (plus EOS) given its prompt."""
    return completion_scores(model, tokenizer, prompts, completions, batch_size)[0]


def completion_loss(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float | None:
    """Mean negative log-likelihood per completion token (EOS included) of ``rows`` ({prompt, completion}): the
    held-out SFT loss, in nats per token, as the SFT trainer's completion-only loss counts it. None without rows."""
    if not rows:
        return None
    prompts = [format_prompt(r["prompt"], tokenizer) for r in rows]
    scores, counts = completion_scores(model, tokenizer, prompts, [r["completion"] for r in rows], batch_size)
    return -sum(scores) / sum(counts)


def pair_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Log-probabilities of the chosen and of the rejected response of each pair."""
    prompts = [format_prompt(r["prompt"], tokenizer) for r in rows]
    return (completion_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size),
            completion_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size))


def preference_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 16,
                        reference: tuple[list[float], list[float]] | None = None) -> dict[str, float]:
    """Share of held-out pairs whose chosen response is more likely than the rejected one, and the mean margin.

    With ``reference`` (``pair_logprobs`` of a reference model, the base), also DPO's implicit reward
    ``log π(y|x) − log π_ref(y|x)``: ``pref_reward_accuracy``, the share of pairs whose chosen response gets the
    higher reward (ties count as misses, as TRL's ``rewards/accuracies``), and ``pref_reward_margin`` (nats)."""
    if not rows:
        return {}
    chosen, rejected = pair_logprobs(model, tokenizer, rows, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    out = {"pref_accuracy": mean(m > 0 for m in margins), "pref_margin": mean(margins)}
    if reference is not None:
        rewards = [(c - c0) - (r - r0) for c, r, c0, r0 in zip(chosen, rejected, *reference)]
        out |= {"pref_reward_accuracy": mean(m > 0 for m in rewards), "pref_reward_margin": mean(rewards)}
    return out


def rec_ratings(judge, tasks: list[dict], generations: list[str], dimensions, citations: str) -> dict[str, float]:
    """Mean REC rating per dimension of a candidate's generations, with parse rate and verified citations.
    An empty generation is not judged: it gets the lowest rating on every dimension."""
    from paft.rec.metrics import verified_rate

    items = [{"instruction": t["question"], "context": t["context"], "response": g} for t, g in zip(tasks, generations)]
    judged = [it for it in items if it["response"].strip()]
    n_empty = len(items) - len(judged)
    out: dict[str, float] = {}
    results = list(judge.judge(judged, "pointwise", list(dimensions), citations)) if judged else []
    if citations != "none":  # over every dimension's judgments
        out["rec_citations_verified"] = verified_rate([[c["verified"] for c in r["citations"]] for r in results if r["parsed"]])
    for k, dim in enumerate(dimensions):
        rs = results[k :: len(dimensions)]
        ratings = [r["rating"] for r in rs if r["parsed"]] + [judge.opt.lo] * n_empty
        out[f"rec_{dim}"] = mean(ratings) if ratings else float("nan")
        out[f"rec_{dim}_parse_rate"] = sum(1 for r in rs if r["parsed"]) / len(rs) if rs else float("nan")
        if citations != "none":
            out[f"rec_{dim}_citations_verified"] = verified_rate([[c["verified"] for c in r["citations"]] for r in rs
                                                                 if r["parsed"]])
    return out
