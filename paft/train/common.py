"""What SFT, alignment and REC training share: the job file, the LoRA config, trainer arguments, summaries."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from paft.io import read_json, write_json


@dataclass
class Job:
    """One training job, written to JSON by the parent and run by ``python -m paft.train JOB.json``."""

    kind: str  # "sft" | "align" | "rec"
    base: str  # model folder or hub id
    data: str  # JSONL file of training rows
    out: str  # output folder (written whole, atomically)
    cfg: dict  # the stage's config section (TrainConfig / AlignConfig / RecConfig as a dict)
    seed: int = 0
    threads: int | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        return cls(**read_json(path))


def lora_config(cfg: dict):
    from peft import LoraConfig

    lora = cfg["lora"]
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def trainer_args(job: Job, output_dir: Path) -> dict:
    """Arguments common to TRL's SFTConfig and DPOConfig."""
    cfg = job.cfg
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg["max_steps"],
        learning_rate=cfg["lr"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        warmup_steps=cfg["warmup_steps"],
        lr_scheduler_type="cosine",
        logging_steps=cfg["logging_steps"],
        max_length=cfg["max_length"],
        save_strategy="no",
        report_to="none",
        seed=job.seed,
        data_seed=job.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=job.dtype == "bfloat16",
        fp16=job.dtype == "float16",
        padding_free=cfg["padding_free"],
        gradient_checkpointing=cfg["gradient_checkpointing"],
        deepspeed=cfg["deepspeed"],
    )


def train_summary(trainer, started: float, **extra) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "start": started,
        "end": time.time(),
        "seconds": round(time.time() - started, 2),
        "steps": trainer.state.global_step,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "log_history": trainer.state.log_history,
        **extra,
    }
