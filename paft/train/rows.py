"""Training rows are checked before training: bad rows stop the job naming the file and row, or are
dropped and counted (``bad_rows: drop``), never silently lost."""

from __future__ import annotations

from collections import Counter

from paft.errors import DataError

FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected")}


def row_problem(kind: str, row: dict, lengths: dict[str, int] | None, max_length: int) -> tuple[str, str] | None:
    """(reason key, message) of the first problem of ``row``, or None."""
    for f in FIELDS[kind]:
        if not isinstance(row.get(f), str):
            return "missing_field", f"field {f!r} is missing or not text"
    for f in FIELDS[kind][1:]:
        if not row[f].strip():
            return f"empty_{f}", f"{f} is empty"
    if kind == "preference" and row["chosen"].strip() == row["rejected"].strip():
        return "chosen_equals_rejected", "chosen is identical to rejected"
    if lengths is not None:
        n = lengths["prompt"] + max(lengths[f] for f in FIELDS[kind][1:]) + 1  # + EOS
        if n > max_length:
            return "too_long", f"{n} tokens, longer than max_length {max_length}"
    return None


def check_rows(kind: str, rows: list[dict], path: str, tokenizer, max_length: int, policy: str,
               render=lambda prompt: prompt) -> tuple[list[dict], dict]:
    """Rows without problems (each with its ``length`` in tokens), and the count of dropped rows per reason.
    ``policy`` "error" raises on the first one.
    ``render`` turns a prompt into the text the model sees, for the length check."""
    kept, dropped = [], Counter()
    for i, row in enumerate(rows, 1):
        lengths = None
        if all(isinstance(row.get(f), str) for f in FIELDS[kind]):
            texts = {f: render(row[f]) if f == "prompt" else row[f] for f in FIELDS[kind]}
            lengths = {f: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for f, t in texts.items()}
        problem = row_problem(kind, row, lengths, max_length)
        if problem is None:
            kept.append({**row, "length": lengths["prompt"] + max(lengths[f] for f in FIELDS[kind][1:])})
        elif policy == "error":
            raise DataError(f"{path}: row {i}: {problem[1]} (set bad_rows: drop to drop such rows, counted)")
        else:
            dropped[problem[0]] += 1
    if not kept:
        raise DataError(f"{path}: no usable training rows ({dict(dropped)} dropped)")
    return kept, dict(dropped)
