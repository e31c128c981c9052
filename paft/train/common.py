"""What SFT, alignment and REC training share: the job file, the PEFT config, trainer arguments,
checkpoints and resume, summaries."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from paft.errors import PaftError
from paft.io import read_json, write_json


@dataclass(frozen=True)
class MlflowRun:
    """The MLflow run a training job logs into (its stage's child run): the trainer's MLflowCallback logs the
    curves there at their global steps, and MLflow samples the system metrics (``system/...``) while the job runs.

    The subprocess gets it in its job file and in MLflow's own environment variables (``env``)."""

    tracking_uri: str
    run_id: str
    experiment_id: str
    system_metrics_interval: float = 2.0  # seconds between system metric samples: short jobs still get a few

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_RUN_ID": self.run_id,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true",
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": str(self.system_metrics_interval),
        }


@dataclass
class Job:
    """One training job, written to JSON by the parent and run by ``python -m paft.train JOB.json``."""

    kind: str  # "sft" | "align" | "rec"
    base: str  # model folder or hub id
    data: str  # JSONL file of training rows
    out: str  # output folder (written whole, atomically)
    cfg: dict  # the stage's config section (SFTConfig / AlignConfig / RecConfig as a dict)
    seed: int = 0
    threads: int | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    mlflow: dict | None = None  # an MlflowRun as a dict: the run the trainer reports to; None: no MLflow logging

    def save(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Job":
        return cls(**read_json(path))

    @property
    def checkpoints(self) -> Path:
        """Checkpoints live beside the output (not inside its temporary folder), so a rerun finds them."""
        out = Path(self.out)
        return out.parent / f"{out.name}.checkpoints"

    @property
    def mlflow_run(self) -> MlflowRun | None:
        return MlflowRun(**self.mlflow) if self.mlflow else None


@contextmanager
def tracked(job: Job) -> Iterator[None]:
    """Around the whole job in the main process (rank 0): its MLflow run is the active one, so the trainer's
    MLflowCallback logs into it, and system metrics are sampled until the job ends (paft/tracking.py)."""
    run = job.mlflow_run
    if run is None:
        yield
        return
    from paft.tracking import job_run

    with job_run(run):
        yield


def peft_config(cfg: dict):
    """A LoRA config, or None for full fine-tuning."""
    if cfg["finetune"] == "full":
        return None
    from peft import LoraConfig

    lora = cfg["lora"]
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )


def run_length(cfg: dict) -> dict:
    """How long the trainer runs: ``epochs`` passes over the rows (``num_train_epochs``, ``max_steps`` -1)
    when set, else ``max_steps`` optimizer steps (the config allows one of them, paft/config.py)."""
    epochs = cfg.get("epochs")  # absent in job files written before the key existed
    if epochs is not None:
        if cfg.get("max_steps") is not None:
            raise PaftError(f"epochs {epochs} and max_steps {cfg['max_steps']} are both set: give one of them")
        return {"num_train_epochs": float(epochs), "max_steps": -1}
    if cfg.get("max_steps") is None:
        raise PaftError("neither max_steps nor epochs is set")
    return {"max_steps": cfg["max_steps"]}


def trainer_args(job: Job) -> dict:
    """Arguments common to TRL's SFTConfig, DPOConfig and ORPOConfig."""
    cfg = job.cfg
    return dict(
        output_dir=str(job.checkpoints),
        **run_length(cfg),
        learning_rate=cfg["lr"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        warmup_steps=cfg["warmup_steps"],
        lr_scheduler_type="cosine",
        logging_steps=cfg["logging_steps"],
        max_length=cfg["max_length"],
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=2,
        report_to=["mlflow"] if job.mlflow else "none",  # the callback logs into the job's run (see tracked)
        seed=job.seed,
        data_seed=job.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=job.dtype == "bfloat16",
        fp16=job.dtype == "float16",
        padding_free=cfg["padding_free"],
        train_sampling_strategy="group_by_length" if cfg["group_by_length"] else "random",
        gradient_checkpointing=cfg["gradient_checkpointing"],
        deepspeed=cfg["deepspeed"],
    )


def make_config(config_cls, **kwargs):
    """``config_cls(**kwargs)``, leaving out options the trainer lacks when they are off; an option that is
    on but unsupported is an error (never silently ignored)."""
    known = {f.name for f in fields(config_cls)}
    for k in [k for k in kwargs if k not in known]:
        if kwargs[k]:
            raise PaftError(f"{config_cls.__name__} has no option {k!r} (set it off for this trainer)")
        del kwargs[k]
    return config_cls(**kwargs)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was written whole; half-written ones (a kill during the save) are removed.

    The trainer writes ``trainer_state.json`` last, so a checkpoint without it is incomplete.
    """
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        if (ckpt / "trainer_state.json").is_file():
            return ckpt
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


def train_and_save(trainer, tokenizer, job: Job, out: Path) -> str | None:
    """Train (resuming from the last checkpoint if a killed run left one) and save model/adapter in ``out``."""
    resume = last_complete_checkpoint(job.checkpoints)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out))  # every process takes part (ZeRO-3 gathers), the main one writes
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the job file records the arguments
        tokenizer.save_pretrained(out)
    return resume.name if resume else None


def finish(job: Job) -> None:
    """The output is whole: the checkpoints are no longer needed."""
    shutil.rmtree(job.checkpoints, ignore_errors=True)


def train_summary(trainer, started: float, **extra) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "start": started,
        "end": time.time(),
        "seconds": round(time.time() - started, 2),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch, 4) if trainer.state.epoch is not None else None,  # passes over the rows done
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "log_history": trainer.state.log_history,
        **extra,
    }
