from paft.rec.parse import parse_judgment, verify_citations
from paft.rec.prompts import rec_prompt, rec_training_row
from paft.rec.schema import Judgment, target_json

EXAMPLE = {
    "instruction": "What is the river of Zorvia?",
    "context": "The river of Zorvia is Tass. The capital of Zorvia is Mibba.",
    "response": "Answer: Mibba.",
    "dimension": "faithfulness",
    "rating": 2,
    "explanation": "The response says Mibba, but the context gives Tass.",
    "citations": [{"statement": "The response says Mibba, but the context gives Tass.", "evidence": ["The river of Zorvia is Tass."]}],
}


def test_target_round_trips_through_the_parser():
    j = parse_judgment(target_json(EXAMPLE))
    assert j == Judgment.model_validate(EXAMPLE)


def test_parser_tolerates_noise_and_rejects_out_of_range():
    text = "Sure, here it is: " + target_json(EXAMPLE) + " trailing words {"
    assert parse_judgment(text).rating == 2
    assert parse_judgment(target_json({**EXAMPLE, "rating": 9})) is None
    assert parse_judgment("no json at all") is None
    assert parse_judgment(target_json(EXAMPLE)[:60]) is None  # a cut-off output is a parse failure, counted as such
    assert parse_judgment('{"dimension": "x", "rating": "five", "explanation": ""}') is None


def test_citations_are_verified_against_the_sources():
    j = Judgment.model_validate(EXAMPLE)
    assert verify_citations(j, [EXAMPLE["context"]]) == [True]
    assert verify_citations(j, ["the  RIVER of zorvia is tass."]) == [True]  # whitespace and case normalised
    forged = Judgment.model_validate({**EXAMPLE, "citations": [{"statement": "s", "evidence": ["The river of Zorvia is Nile."]}]})
    assert verify_citations(forged, [EXAMPLE["context"]]) == [False]
    empty = Judgment.model_validate({**EXAMPLE, "citations": [{"statement": "s", "evidence": []}]})
    assert verify_citations(empty, [EXAMPLE["context"]]) == [False]


def test_prompt_carries_dimension_scale_and_all_sources():
    p = rec_prompt(EXAMPLE["instruction"], EXAMPLE["context"], EXAMPLE["response"], "instruction_following", 0, 10)
    assert "instruction following on a scale of 0 to 10" in p
    for part in (EXAMPLE["instruction"], EXAMPLE["context"], EXAMPLE["response"]):
        assert part in p
    row = rec_training_row(EXAMPLE)
    assert row["prompt"].endswith("### Judgment:\n") and row["completion"] == target_json(EXAMPLE)
