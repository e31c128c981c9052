"""Preference alignment with TRL's DPOTrainer and LoRA.

The reference model is the base with the adapter disabled (``ref_model=None`` with a peft
config), so there is no second copy of the weights in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

from paft.data.formats import format_prompt
from paft.io import read_jsonl
from paft.train.common import Job, lora_config, train_summary, trainer_args


def train_align(job: Job, out: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from paft.models import load_model

    started = time.time()
    tokenizer, model = load_model(job.base, job.dtype, job.trust_remote_code)
    rows = [
        {"prompt": format_prompt(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in read_jsonl(job.data)
    ]
    cfg = job.cfg
    args = DPOConfig(
        **trainer_args(job, out / "_trainer"),
        beta=cfg["beta"],
        loss_type=[cfg["loss_type"]],
        label_smoothing=cfg["label_smoothing"],
        precompute_ref_log_probs=cfg["precompute_ref_log_probs"],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rewards = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    extra = {"reward_accuracy_last": rewards[-1]["rewards/accuracies"]} if rewards else {}
    return train_summary(trainer, started, rows=len(rows), method=cfg["method"], **extra)
