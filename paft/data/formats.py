"""How an instruction becomes a model prompt — one place, used by training and evaluation alike.

A tokenizer with a chat template (an instruct model) gets its own template: training rows become
conversational (TRL applies the template and masks the prompt), evaluation prompts are rendered with
``add_generation_prompt``. Otherwise (the tiny default, base models) a plain template is used.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ANSWER_FIELDS = {"sft": ("completion",), "preference": ("chosen", "rejected")}


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(instruction: str, tokenizer=None, plain_template: bool = True) -> str:
    """The prompt text a model sees. ``plain_template=False``: the text is already a complete prompt
    (e.g. REC's) and only a chat template, if any, wraps it."""
    if tokenizer is not None and uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": instruction.strip()}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(instruction=instruction.strip()) if plain_template else instruction


def training_example(kind: str, row: dict, tokenizer, plain_template: bool = True) -> dict:
    """A TRL dataset row: prompt/completion (or prompt/chosen/rejected) as text, or as messages when the
    tokenizer has a chat template."""
    answers = ANSWER_FIELDS[kind]
    if uses_chat_template(tokenizer):
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                **{k: [{"role": "assistant", "content": row[k]}] for k in answers}}
    return {"prompt": format_prompt(row["prompt"], None, plain_template), **{k: row[k] for k in answers}}
