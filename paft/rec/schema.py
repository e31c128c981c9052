"""The REC judgment: what the evaluator writes for one response on one dimension."""

from __future__ import annotations

import json

from pydantic import BaseModel, Field

RUBRICS = {
    "faithfulness": "Every claim in the response is supported by the context; contradicted or invented claims lower the rating.",
    "instruction_following": "The response does what the question asks, not something else.",
    "coherence": "The response is well formed and readable, without repetition or scrambled words.",
    "completeness": "The response gives every part the question asks for.",
}


class Citation(BaseModel):
    statement: str  # one sentence of the explanation
    evidence: list[str] = Field(default_factory=list)  # verbatim spans from the source (context, question or response)


class Judgment(BaseModel):
    dimension: str
    rating: int
    explanation: str
    citations: list[Citation] = Field(default_factory=list)


def target_json(example: dict) -> str:
    """The training target for a REC example: compact JSON, keys in a fixed order."""
    j = Judgment(
        dimension=example["dimension"],
        rating=example["rating"],
        explanation=example["explanation"],
        citations=example.get("citations", []),
    )
    return json.dumps(j.model_dump(), ensure_ascii=False, separators=(", ", ": "))
