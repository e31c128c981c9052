"""Loaders that turn real data sets (local files or hub data sets) into the project's normalised records.

Records (every text field stripped of surrounding whitespace):

``sft``         {"prompt": str, "completion": str, "source": str}
``preference``  {"prompt": str, "chosen": str, "rejected": str, "source": str}

``prompt`` is plain text, never chat-formatted (paft.data.formats does that later): the raw user
instruction, with any separate input appended after a blank line. A conversation with earlier turns
is rendered as a plain transcript ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: <last question>"``;
a conversation of one user turn is just that turn's text, so single-turn prompts look the same
whatever the source.

``FORMATS`` maps a format name to ``(role, converter)``. A converter takes one source row (a dict)
and a ``note(reason)`` callback and returns the records made from it (without ``source``); it raises
``Drop(reason)`` to drop the row (counted) and ``RowError(field, problem)`` for a malformed row
(a DataError naming the file, the 1-based row number and the field). Rows whose prompt or
completion / chosen / rejected is empty, and pairs whose chosen equals rejected, are dropped and
counted too. Nothing is dropped silently: ``LoadResult.dropped`` holds the counts per reason, and
``LoadResult.notes`` counts rows kept with a repair (e.g. ``prompt_mismatch``).

Every format works for both ``load_local`` and ``load_hub``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paft.errors import DataError
from paft.io import parse_jsonl, read_jsonl

ROLES = ("sft", "preference")
_TEXT_FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected")}


@dataclass
class LoadResult:
    role: str  # "sft" or "preference"
    rows: list[dict]
    dropped: dict[str, int]  # reason -> rows dropped
    path: str  # the local file, or the hub data set's name
    notes: dict[str, int] = field(default_factory=dict)  # reason -> rows kept with a repair


class Drop(Exception):
    """Raised by a converter: drop this row and count it under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RowError(Exception):
    """Raised by a converter: the row is malformed (``field`` missing or of the wrong type)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")
        self.field = field
        self.problem = problem


Note = Callable[[str], None]
Converter = Callable[[Mapping[str, Any], Note], list[dict]]


# ----------------------------------------------------------------------------- field helpers
def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _get(row: Mapping, key: str, types: type | tuple[type, ...], *, name: str | None = None, optional: bool = False, default=None):
    name = name or key
    if key not in row or (optional and row[key] is None):
        if optional:
            return default
        raise RowError(name, "missing")
    value = row[key]
    want = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
        raise RowError(name, f"expected {' or '.join(t.__name__ for t in want)}, got {_type_name(value)}")
    return value


def _str(row: Mapping, key: str, *, name: str | None = None, optional: bool = False) -> str:
    return _get(row, key, str, name=name, optional=optional, default="")


def _join_input(instruction: str, extra: str) -> str:
    instruction, extra = instruction.strip(), extra.strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


# ----------------------------------------------------------------------------- conversations
_SPEAKER = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant", "system": "System"}


def render_turns(turns: list[tuple[str, str]]) -> str:
    """Plain-text prompt from ``(speaker, text)`` turns ("Human", "Assistant", "System").

    One Human turn alone is returned as its bare text; otherwise ``"Speaker: text"`` blocks joined
    by blank lines. The prompt ends with the last turn before the answer (no trailing marker).
    """
    turns = [(who, text.strip()) for who, text in turns]
    if len(turns) == 1 and turns[0][0] == "Human":
        return turns[0][1]
    return "\n\n".join((f"{who}: {text}" if who else text).rstrip() for who, text in turns if text or who)


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"


def _hh_split(transcript: str) -> tuple[str, list[tuple[str, str]], str]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a"`` -> (prefix text, prefix turns, final answer)."""
    cut = transcript.rfind(_HH_LAST)
    if cut < 0:
        raise Drop("no_assistant_turn")
    prefix, answer = transcript[:cut], transcript[cut + len(_HH_LAST):]
    parts = _HH_MARKER.split(prefix)
    turns: list[tuple[str, str]] = []
    if parts[0].strip():  # text before the first marker: keep it, unlabelled
        turns.append(("", parts[0]))
    turns.extend((parts[i], parts[i + 1]) for i in range(1, len(parts), 2))
    return prefix, turns, answer


def _messages(row: Mapping, key: str) -> list[tuple[str, str]]:
    msgs = _get(row, key, list)
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise RowError(f"{key}[{i}]", f"expected a message object, got {_type_name(m)}")
        role = _str(m, "role", name=f"{key}[{i}].role")
        content = _str(m, "content", name=f"{key}[{i}].content")
        out.append((role, content))
    return out


def _split_last_assistant(msgs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """(turns before the last assistant message, its content); later turns are ignored."""
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i][0].lower() in ("assistant", "gpt"):
            prefix = [(_SPEAKER.get(r.lower(), r.capitalize()), c) for r, c in msgs[:i]]
            return prefix, msgs[i][1]
    raise Drop("no_assistant_turn")


# ----------------------------------------------------------------------------- converters
def _alpaca_eval_outputs(row, note):
    return [{"prompt": _str(row, "instruction"), "completion": _str(row, "output")}]


def _self_instruct(row, note):
    instruction = _str(row, "instruction")
    instances = _get(row, "instances", list)
    if not instances:
        raise Drop("no_instances")
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, Mapping):
            raise RowError(f"instances[{i}]", f"expected an object, got {_type_name(inst)}")
        extra = _str(inst, "input", name=f"instances[{i}].input", optional=True)
        output = _str(inst, "output", name=f"instances[{i}].output")
        out.append({"prompt": _join_input(instruction, extra), "completion": output})
    return out


def _hh_rlhf(row, note):
    chosen, rejected = _str(row, "chosen"), _str(row, "rejected")
    c_prefix, c_turns, c_answer = _hh_split(chosen)
    r_prefix, _, r_answer = _hh_split(rejected)
    if c_prefix.strip() != r_prefix.strip():
        note("prompt_mismatch")  # the two transcripts diverge before the last turn: keep chosen's
    return [{"prompt": render_turns(c_turns), "chosen": c_answer, "rejected": r_answer}]


def _alpaca_eval_annotations(row, note):
    instruction, out1, out2 = _str(row, "instruction"), _str(row, "output_1"), _str(row, "output_2")
    pref = _get(row, "preference", (int, float), optional=True)
    if pref is None:
        raise Drop("no_preference")
    if pref != int(pref):
        raise Drop("non_integral_preference")
    pref = int(pref)
    if pref == 0:
        raise Drop("tie")
    if pref not in (1, 2):
        raise RowError("preference", f"expected 0, 1 or 2, got {row['preference']!r}")
    chosen, rejected = (out1, out2) if pref == 1 else (out2, out1)
    return [{"prompt": instruction, "chosen": chosen, "rejected": rejected}]


def _sft_generic(row, note):
    if "prompt" in row:
        return [{"prompt": _str(row, "prompt"), "completion": _str(row, "completion")}]
    if "instruction" in row:
        prompt = _join_input(_str(row, "instruction"), _str(row, "input", optional=True))
        return [{"prompt": prompt, "completion": _str(row, "output")}]
    raise RowError("prompt", "missing (expected prompt/completion or instruction/[input]/output)")


def _preference_generic(row, note):
    return [{"prompt": _str(row, "prompt"), "chosen": _str(row, "chosen"), "rejected": _str(row, "rejected")}]


def _messages_sft(row, note):
    prefix, answer = _split_last_assistant(_messages(row, "messages"))
    return [{"prompt": render_turns(prefix), "completion": answer}]


def _ultrafeedback(row, note):
    c_prefix, chosen = _split_last_assistant(_messages(row, "chosen"))
    r_prefix, rejected = _split_last_assistant(_messages(row, "rejected"))
    if c_prefix:
        prompt = render_turns(c_prefix)
        if [(w, t.strip()) for w, t in c_prefix] != [(w, t.strip()) for w, t in r_prefix]:
            note("prompt_mismatch")
    else:  # chosen / rejected hold only the answers
        prompt = _str(row, "prompt")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]


FORMATS: dict[str, tuple[str, Converter]] = {
    # local files (also on the hub under the same layout)
    "alpaca_eval_outputs": ("sft", _alpaca_eval_outputs),  # [{instruction, output, generator, dataset}]
    "self_instruct": ("sft", _self_instruct),  # {instruction, instances: [{input, output}]}: one record per instance
    "hh_rlhf": ("preference", _hh_rlhf),  # {chosen, rejected}: "\n\nHuman: ...\n\nAssistant: ..." transcripts
    "alpaca_eval_annotations": ("preference", _alpaca_eval_annotations),  # {instruction, output_1, output_2, preference}
    "sft_jsonl": ("sft", _sft_generic),  # {prompt, completion} or {instruction, [input], output}
    "preference_jsonl": ("preference", _preference_generic),  # {prompt, chosen, rejected}
    # hub layouts
    "messages": ("sft", _messages_sft),  # {messages: [{role, content}]} (UltraChat-style)
    "ultrafeedback_binarized": ("preference", _ultrafeedback),  # {prompt, chosen: [msgs], rejected: [msgs]}
}


def _lookup(format: str) -> tuple[str, Converter]:
    try:
        return FORMATS[format]
    except (KeyError, TypeError):
        raise DataError(f"unknown data format {format!r}; known formats: {', '.join(sorted(FORMATS))}") from None


# ----------------------------------------------------------------------------- reading files
def _parse_json(text: str, path: Path) -> list[dict]:
    """A JSON list of objects, or JSON lines in a file named .json (detected)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one top-level value: JSON lines
            return parse_jsonl(text.splitlines(), path)
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and "\n" not in text.strip():
        data = [data]  # a JSON-lines file of one line
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON lines), got a JSON {_type_name(data)}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {_type_name(row)}")
    return data


def read_rows(path: str | Path) -> list[dict]:
    """Raw rows of a .json (list or JSON lines), .jsonl, .json.gz or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name = path.name.lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    if not stem.endswith((".json", ".jsonl")):
        raise DataError(f"{path}: unsupported file type (expected .json, .jsonl, .json.gz or .jsonl.gz)")
    try:
        if stem.endswith(".jsonl") and not gz:
            return read_jsonl(path)
        if gz:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    text = text.removeprefix("\ufeff")
    if stem.endswith(".jsonl"):
        return parse_jsonl(text.splitlines(), path)
    return _parse_json(text, path)


# ----------------------------------------------------------------------------- conversion
def _convert(rows: Iterable[Mapping], format: str, where: str, source: str, limit: int | None) -> tuple[str, list[dict], dict, dict]:
    role, converter = _lookup(format)
    dropped: Counter[str] = Counter()
    notes: Counter[str] = Counter()
    out: list[dict] = []
    if limit == 0:
        return role, out, {}, {}
    for rowno, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: row {rowno}: expected an object, got {_type_name(row)}")
        row_notes: list[str] = []
        try:
            records = converter(row, row_notes.append)
        except Drop as d:
            dropped[d.reason] += 1
            continue
        except RowError as e:
            raise DataError(f"{where}: row {rowno}: field {e.field!r} {e.problem}") from None
        notes.update(row_notes)
        for rec in records:
            rec = {k: rec[k].strip() for k in _TEXT_FIELDS[role]}
            empty = next((k for k in _TEXT_FIELDS[role] if not rec[k]), None)
            if empty is not None:
                dropped[f"empty_{empty}"] += 1
                continue
            if role == "preference" and rec["chosen"] == rec["rejected"]:
                dropped["chosen_equals_rejected"] += 1
                continue
            rec["source"] = source
            out.append(rec)
            if limit is not None and len(out) >= limit:
                return role, out, dict(dropped), dict(notes)
    return role, out, dict(dropped), dict(notes)


def _check_args(format: str, limit) -> None:
    _lookup(format)  # an unknown format is reported before any data is read
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")


def load_local(path: str | Path, format: str, *, limit: int | None = None) -> LoadResult:
    """Load a local file in ``format`` (a key of FORMATS); ``limit`` keeps the first N records.

    With ``limit``, reading stops at the N-th kept record: drops are counted up to there.
    ``source`` of every record is the file's name.
    """
    _check_args(format, limit)
    path = Path(path)
    rows = read_rows(path)
    role, out, dropped, notes = _convert(rows, format, str(path), path.name, limit)
    return LoadResult(role=role, rows=out, dropped=dropped, path=str(path), notes=notes)


def load_hub(name: str, *, format: str, split: str = "train", config: str | None = None, limit: int | None = None) -> LoadResult:
    """Load a hub data set through ``datasets.load_dataset(name, config, split=split)``.

    ``source`` of every record is ``name[/config]:split``.
    """
    _check_args(format, limit)
    label = f"{name}/{config}" if config else name
    where = f"hub data set {label!r} (split {split!r})"
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{where}: the 'datasets' package is needed to load hub data sets ({e})") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, missing data set, bad config or split, ...
        raise DataError(f"{where}: could not load ({type(e).__name__}: {e})") from None
    role, out, dropped, notes = _convert(ds, format, where, f"{label}:{split}", limit)
    return LoadResult(role=role, rows=out, dropped=dropped, path=name, notes=notes)
