"""Tolerant parsing of REC output, and verification of its citations against the source."""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

from paft.rec.schema import Judgment

_WS = re.compile(r"\s+")


def parse_judgment(text: str, lo: int = 1, hi: int = 5) -> Judgment | None:
    """The first JSON object in ``text`` that is a valid judgment with a rating in range, else None."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            j = Judgment.model_validate(obj)
            if lo <= j.rating <= hi:
                return j
        except (json.JSONDecodeError, ValidationError, TypeError):
            pass
        start = text.find("{", start + 1)
    return None


def _norm(s: str) -> str:
    return _WS.sub(" ", s).strip().lower()


def verify_citations(judgment: Judgment, sources: list[str]) -> list[bool]:
    """Per citation: True when every evidence span occurs in a source (exactly, or after whitespace/case normalising)."""
    normed = [_norm(s) for s in sources]
    out = []
    for c in judgment.citations:
        ok = bool(c.evidence) and all(any(e in s for s in sources) or any(_norm(e) in n for n in normed) for e in c.evidence)
        out.append(ok)
    return out
