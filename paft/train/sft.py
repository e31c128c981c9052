"""Supervised fine-tuning with TRL's SFTTrainer and LoRA (completion-only loss on prompt/completion pairs)."""

from __future__ import annotations

import time
from pathlib import Path

from paft.data.formats import format_prompt
from paft.io import read_jsonl
from paft.train.common import Job, lora_config, train_summary, trainer_args


def sft_rows(job: Job) -> list[dict]:
    if job.kind == "rec":
        from paft.rec.prompts import rec_training_row

        return [rec_training_row(r, job.cfg["scale_min"], job.cfg["scale_max"]) for r in read_jsonl(job.data)]
    return [{"prompt": format_prompt(r["prompt"]), "completion": r["completion"]} for r in read_jsonl(job.data)]


def train_sft(job: Job, out: Path) -> dict:
    """Train a LoRA adapter on ``job.data`` and save it in ``out``; returns the summary."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from paft.models import load_model

    started = time.time()
    tokenizer, model = load_model(job.base, job.dtype, job.trust_remote_code)
    rows = sft_rows(job)
    args = SFTConfig(**trainer_args(job, out / "_trainer"), completion_only_loss=True, packing=job.cfg["packing"])
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(job.cfg),
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return train_summary(trainer, started, rows=len(rows))
