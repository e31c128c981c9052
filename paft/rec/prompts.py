"""REC prompts: rate one response on one dimension, explain, cite the source verbatim."""

from __future__ import annotations

from paft.rec.schema import RUBRICS, target_json

TEMPLATE = (
    "### Rate the response for {dimension} on a scale of {lo} to {hi}. {rubric} "
    "Explain the rating and cite evidence verbatim.\n"
    "### Context:\n{context}\n"
    "### Question:\n{instruction}\n"
    "### Response:\n{response}\n"
    "### Judgment:\n"
)


def rec_prompt(instruction: str, context: str, response: str, dimension: str, lo: int = 1, hi: int = 5) -> str:
    return TEMPLATE.format(
        dimension=dimension.replace("_", " "),
        lo=lo,
        hi=hi,
        rubric=RUBRICS[dimension],
        context=context.strip(),
        instruction=instruction.strip(),
        response=response.strip(),
    )


def rec_training_row(example: dict, lo: int = 1, hi: int = 5) -> dict:
    """A REC example as an SFT prompt/completion pair."""
    return {
        "prompt": rec_prompt(example["instruction"], example["context"], example["response"], example["dimension"], lo, hi),
        "completion": target_json(example),
    }
