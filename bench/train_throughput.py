#!/usr/bin/env python
"""Training throughput: paft's SFT and DPO settings against TRL's defaults, side by side in one run.

    .venv/bin/python bench/train_throughput.py            # default: ~5-8 min on 2 CPU cores
    .venv/bin/python bench/train_throughput.py --quick    # < 2 min, a smoke run (noisy)

One small Llama (``paft.models.build_tiny``, BPE tokenizer from ``paft.models.train_tokenizer``) is
built once and saved to a temporary folder; every run loads it fresh (``paft.models.load_model``) and
trains the same LoRA adapter (``paft.train.common.peft_config``) on the same synthetic rows
(``paft.data.world.generate``, prompts through ``format_prompt``). A share of the rows gets a long
context (extra facts of the same world) so that the lengths vary and a padded batch is mostly padding.

Settings (same batch size, learning rate, LoRA config, data and seed in each round):

* SFT  ``TRL defaults``: ``SFTConfig`` with only output_dir, batch size, max_steps, lr, report_to,
  seed (TRL's defaults then: max_length 1024, gradient_checkpointing=True, bf16=True, no packing;
  completion-only loss is on by default for prompt/completion rows).
  ``paft, packing=False``: paft's args (``trainer_args``) with the config's default packing=False.
  ``paft, packing=True``: ours; TRL's BFD packing, which is padding-free (flattened batch, position_ids).
  ``paft, padding_free=True, packing=False``: tried; TRL refuses it while max_length is set.
* DPO  ``TRL defaults``: ``DPOConfig`` with the same few arguments and a peft LoRA (reference = adapter
  disabled, one extra no-grad forward per step).
  ``paft, precompute=False``: paft's args (``align.py``) with the config's default.
  ``paft, precompute=True``: ours; the reference log-probs are computed once before training. Reported
  per step (steady state) and with the precompute time included (each pair trained once: the worst case),
  plus that time amortized over the epochs of paft's default run.
  ``paft, padding_free=True``: tried; TRL 1.16's DPOTrainer disables it (falls back to padding).

Measurement: each round builds every setting's trainer anew, runs ``warmup + steps/rounds`` optimizer
steps and times the steps after the warmup (wall clock between ``on_step_end`` callbacks: data loading,
collation, forward, backward, optimizer, logging). Rounds alternate the order of the settings
(A B C, C B A, ...) to spread the drift of a shared machine. Tokens are the real (non-pad) input tokens
of the batches the timed steps trained on (``attention_mask`` sum, or the flattened length when
padding-free), so packing, which changes the examples per step, is counted the same way as padding;
examples are SFT rows / DPO pairs (packed rows counted by their sequences).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

AIM = 1.3
# TRL's configs default to bf16=True, which transformers refuses on a machine without a GPU unless use_cpu=True
# ("Your setup doesn't support bf16/gpu"); so the TRL-defaults runs pass use_cpu on such a machine (and keep bf16).
CPU_ONLY = False  # set in main()
SIZES = {  # TinyModelConfig fields
    "tiny": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, vocab_size=1024),
    "small": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, vocab_size=2048),
}


# ----------------------------------------------------------------------------- data
def build_data(seed: int, n_sft: int, n_pref: int, long_frac: float, max_length: int, vocab_size: int):
    """Synthetic SFT / preference rows (formatted), a tokenizer trained on their text, and length stats."""
    from paft.config import DIMENSIONS
    from paft.data.formats import format_prompt
    from paft.data.world import World, generate
    from paft.models import train_tokenizer

    data = generate(seed, n_sft, n_pref, 0, 4, DIMENSIONS)
    world = World(seed)
    facts = [s.strip() + "." for doc in world.documents() for s in doc.split(".") if s.strip()]
    texts = [r["text"] for r in data["corpus"]] + world.documents()
    texts += [v for r in data["sft"] + data["preference"] for k, v in r.items() if k != "source"]
    tokenizer = train_tokenizer(texts, vocab_size)
    n_tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    fact_len = {f: n_tok(" " + f) for f in facts}
    rng = random.Random(f"{seed}-bench-lengths")
    max_tokens = max_length - 16  # margin: prompt and answer are tokenized apart by TRL and check_rows

    def lengthen(instruction: str, answer: str) -> str:
        """Prepend facts of the same world to the context until prompt + answer reach a random target length."""
        if rng.random() >= long_frac or not instruction.startswith("Context: "):
            return instruction
        base = n_tok(format_prompt(instruction) + answer) + 1
        target = rng.randint(max(base, max_tokens // 2), max_tokens)
        extra: list[str] = []
        total = base
        while True:
            f = rng.choice(facts)
            if total + fact_len[f] > target:
                break
            extra.append(f)
            total += fact_len[f]
        return "Context: " + " ".join(extra) + " " + instruction[len("Context: "):]

    sft = [
        {"prompt": format_prompt(lengthen(r["prompt"], r["completion"])), "completion": r["completion"]}
        for r in data["sft"]
    ]
    pref = []
    for r in data["preference"]:
        longer = max(r["chosen"], r["rejected"], key=n_tok)
        pref.append({"prompt": format_prompt(lengthen(r["prompt"], longer)), "chosen": r["chosen"], "rejected": r["rejected"]})
    from paft.train.rows import check_rows  # paft's own row check: no row may exceed max_length

    check_rows("sft", sft, "bench sft rows", tokenizer, max_length, "error")
    check_rows("preference", pref, "bench preference rows", tokenizer, max_length, "error")
    sft_len = [n_tok(r["prompt"] + r["completion"]) + 1 for r in sft]
    pref_len = [n_tok(r["prompt"] + max(r["chosen"], r["rejected"], key=n_tok)) + 1 for r in pref]
    return tokenizer, sft, pref, sft_len, pref_len


def build_model(size: str, tokenizer, folder: Path) -> int:
    from paft.config import TinyModelConfig
    from paft.models import build_tiny

    cfg = TinyModelConfig(**SIZES[size], max_position_embeddings=1024)
    model = build_tiny(cfg, tokenizer, seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- measurement
@dataclass
class Run:
    """One setting's measurements, summed over the rounds."""

    tokens: int = 0  # real (non-pad) input tokens of the timed steps
    positions: int = 0  # input positions incl. padding
    examples: int = 0  # SFT sequences / DPO pairs
    steps: int = 0
    seconds: float = 0.0  # timed steps' wall time
    precompute_s: float = 0.0  # DPO reference precompute (+ the model hash it needs), whole dataset
    precompute_pairs: int = 0
    per_round: list[float] = field(default_factory=list)  # tokens/s of each round
    round_seconds: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def ex_s(self) -> float:
        return self.examples / self.seconds if self.seconds else float("nan")

    @property
    def precompute_per_pair(self) -> float:
        return self.precompute_s / self.precompute_pairs if self.precompute_pairs else 0.0

    def tok_s_with_precompute(self, epochs: float = 1.0) -> float:
        """Tokens/s when each trained pair also pays its share of the precompute (``epochs`` passes per pair)."""
        return self.tokens / (self.seconds + self.precompute_per_pair * self.examples / epochs)


def _batch_stats(inputs) -> tuple[int, int, int]:
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        tokens = int(inputs["attention_mask"].sum())
        examples = ids.shape[0]
    else:  # padding-free: one flattened row; sequences start where position_ids restart at 0
        tokens = ids.numel()
        examples = int((inputs["position_ids"] == 0).sum()) if "position_ids" in inputs else ids.shape[0]
    return tokens, ids.numel(), examples


def _instrument(trainer, pairs: bool):
    """Record the batch of every training step (instance attribute: the trainer's own class is unchanged)."""
    trainer.bench_batches = []
    step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        tokens, positions, examples = _batch_stats(inputs)
        trainer.bench_batches.append((tokens, positions, examples // 2 if pairs else examples))
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


@contextlib.contextmanager
def _timed_precompute(box: dict):
    """Time DPOTrainer's reference precompute and the hash of the weights it needs (both run in __init__)."""
    import trl.trainer.dpo_trainer as dpo_mod

    orig_hash, orig_pre = dpo_mod.hash_module, dpo_mod.DPOTrainer._precompute_ref_logps

    def timed_hash(*a, **k):
        t = time.perf_counter()
        try:
            return orig_hash(*a, **k)
        finally:
            box["seconds"] = box.get("seconds", 0.0) + time.perf_counter() - t

    def timed_pre(self, dataset, *a, **k):
        t = time.perf_counter()
        try:
            return orig_pre(self, dataset, *a, **k)
        finally:
            box["seconds"] = box.get("seconds", 0.0) + time.perf_counter() - t
            box["pairs"] = box.get("pairs", 0) + len(dataset)

    dpo_mod.hash_module, dpo_mod.DPOTrainer._precompute_ref_logps = timed_hash, timed_pre
    try:
        yield
    finally:
        dpo_mod.hash_module, dpo_mod.DPOTrainer._precompute_ref_logps = orig_hash, orig_pre


def _quiet_trainer(trainer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def run_once(make, total_steps: int, warmup: int, run: Run, pairs: bool) -> None:
    """Build a trainer with ``make(max_steps)``, train, and add the timed steps to ``run``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    pre: dict = {}
    with _timed_precompute(pre):
        trainer = make(total_steps)
    _quiet_trainer(trainer)
    _instrument(trainer, pairs)
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    ends, batches = clock.ends, trainer.bench_batches
    if len(ends) != total_steps or len(batches) != total_steps:
        raise RuntimeError(f"expected {total_steps} steps, saw {len(ends)} step ends and {len(batches)} batches")
    timed = batches[warmup:]
    seconds = ends[-1] - ends[warmup - 1]
    tokens = sum(b[0] for b in timed)
    run.tokens += tokens
    run.positions += sum(b[1] for b in timed)
    run.examples += sum(b[2] for b in timed)
    run.steps += len(timed)
    run.seconds += seconds
    run.per_round.append(tokens / seconds)
    if pre.get("pairs"):
        run.precompute_s += pre["seconds"]
        run.precompute_pairs += pre["pairs"]
    del trainer


# ----------------------------------------------------------------------------- settings
def paft_job(stage: str, model_dir: Path, work: Path, tag: str, seed: int, **over):
    """A paft Job with the stage's default config section (as params.yaml gives it), overridden by ``over``."""
    from paft.config import Params
    from paft.train.common import Job

    cfg = getattr(Params().train, stage).model_dump()
    unknown = set(over) - set(cfg)
    if unknown:
        raise KeyError(f"train.{stage} has no {sorted(unknown)}")
    cfg.update(over)
    kind = "sft" if stage == "sft" else "align"
    return Job(kind=kind, base=str(model_dir), data="", out=str(work / f"{kind}-{tag}"), cfg=cfg, seed=seed)


def sft_settings(model_dir: Path, work: Path, rows: list[dict], batch_size: int, lr: float):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from paft.models import load_model
    from paft.train.common import make_config, peft_config, trainer_args

    lora = peft_config(paft_job("sft", model_dir, work, "lora", 0).cfg)  # the same LoRA for every setting

    def trl_default(seed):
        def make(steps):
            tokenizer, model = load_model(str(model_dir))
            args = SFTConfig(output_dir=str(work / "sft-trl"), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, report_to="none", seed=seed, use_cpu=CPU_ONLY)
            return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=lora)
        return make

    def paft(tag, **over):
        def factory(seed):
            def make(steps):
                # what paft.train.sft.train_sft builds
                job = paft_job("sft", model_dir, work, tag, seed, batch_size=batch_size, lr=lr, max_steps=steps, **over)
                cfg = job.cfg
                tokenizer, model = load_model(job.base, job.dtype, job.trust_remote_code)
                args = make_config(SFTConfig, **trainer_args(job), completion_only_loss=True, packing=cfg["packing"])
                trainer_cls, extra = SFTTrainer, {}
                l1 = cfg.get("l1") or {"weight": 0.0}
                if l1["weight"] > 0:
                    from paft.train.l1 import l1_trainer_class

                    trainer_cls, extra = l1_trainer_class(SFTTrainer), {"l1_weight": l1["weight"], "l1_target": l1["target"]}
                return trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer, peft_config=peft_config(cfg), **extra)
            return make
        return factory

    return [
        ("TRL defaults", trl_default, "base"),
        ("paft, packing=False (config default)", paft("plain", packing=False, padding_free=False), "info"),
        ("paft, packing=True (ours)", paft("packed", packing=True, padding_free=True), "ours"),
        ("paft, padding_free=True, packing=False", paft("pf", packing=False, padding_free=True), "probe"),
    ]


def dpo_settings(model_dir: Path, work: Path, batch_size: int, lr: float):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from paft.models import load_model
    from paft.train.align import _trainer as paft_align_trainer
    from paft.train.common import peft_config

    lora = peft_config(paft_job("align", model_dir, work, "lora", 0).cfg)

    def trl_default(seed, data):
        def make(steps):
            tokenizer, model = load_model(str(model_dir))
            args = DPOConfig(output_dir=str(work / "dpo-trl"), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, report_to="none", seed=seed, use_cpu=CPU_ONLY)
            return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(data),
                              processing_class=tokenizer, peft_config=lora)
        return make

    def paft(tag, **over):
        def factory(seed, data):
            def make(steps):
                # paft.train.align builds the trainer with _trainer(job, model, tokenizer, dataset)
                job = paft_job("align", model_dir, work, tag, seed, batch_size=batch_size, lr=lr, max_steps=steps, **over)
                tokenizer, model = load_model(job.base, job.dtype, job.trust_remote_code)
                return paft_align_trainer(job, model, tokenizer, Dataset.from_list(data))
            return make
        return factory

    return [
        ("TRL defaults", trl_default, "base"),
        ("paft, precompute=False (config default)", paft("plain", precompute_ref_log_probs=False), "info"),
        ("paft, precompute=True (ours)", paft("pre", precompute_ref_log_probs=True), "ours"),
        ("paft, padding_free=True", paft("pf", padding_free=True), "probe"),
    ]


def probe(make, attr: str | None = None) -> str | None:
    """Build the trainer for a setting that may be unsupported; the reason it is skipped, or None if it runs."""
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    loggers = [logging.getLogger(n) for n in ("trl", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        trainer = make(1)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    if attr and not getattr(trainer, attr):
        said = " ".join(log.getvalue().split())
        return f"the trainer turned it off ({attr}=False){': ' + said if said else ''}"
    return None


# ----------------------------------------------------------------------------- report
def table(title: str, runs: dict[str, Run], base: str, unit: str, notes: list[str], extra_rows: list[tuple] = ()):
    head = f"{'setting':42} {'tokens/s':>9} {unit + '/s':>10} {'pad %':>6} {'tok/step':>9} {'s/step':>7} {'× TRL':>6}  per-round × TRL"
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    b = runs[base]
    for name, r in runs.items():
        pad = 100 * (1 - r.tokens / r.positions) if r.positions else 0.0
        rounds = " ".join(f"{x / y:.2f}" for x, y in zip(r.per_round, b.per_round))
        print(f"{name:42} {r.tok_s:9.0f} {r.ex_s:10.2f} {pad:6.1f} {r.tokens / r.steps:9.0f} "
              f"{r.seconds / r.steps:7.3f} {r.tok_s / b.tok_s:6.2f}  {rounds}")
    for name, tok_s, ex_s in extra_rows:
        print(f"{name:42} {tok_s:9.0f} {ex_s:10.2f} {'':>6} {'':>9} {'':>7} {tok_s / b.tok_s:6.2f}")
    for n in notes:
        print(f"  note: {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per setting, over all rounds (default 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all settings, alternating order (default 3)")
    p.add_argument("--batch-size", type=int, default=8, help="per-device batch size for every setting (default 8)")
    p.add_argument("--model-size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--long-frac", type=float, default=0.3, help="share of rows given a long context (default 0.3)")
    p.add_argument("--only", choices=["sft", "dpo"], help="run one trainer only")
    p.add_argument("--quick", action="store_true", help="a smoke run in < 2 min: 2 rounds of 1 warmup + 3 timed steps")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.rounds = 6, 1, 2
    if a.warmup < 1 or a.steps < 1 or a.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    global CPU_ONLY
    CPU_ONLY = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for name in ("trl", "peft", "accelerate", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import peft
    import trl

    from paft.config import Params

    sft_cfg, align_cfg = Params().train.sft, Params().train.align  # paft's defaults (params.yaml without overrides)
    sft_lr = sft_cfg.lr

    per_round = math.ceil(a.steps / a.rounds)
    total = a.warmup + per_round
    max_len = min(sft_cfg.max_length, align_cfg.max_length)  # paft's max_length: keep every row within it, so no setting truncates
    started = time.perf_counter()
    tokenizer, sft_rows, pref_rows, sft_len, pref_len = build_data(
        a.seed, n_sft=800, n_pref=max(64, a.rounds * total * a.batch_size), long_frac=a.long_frac,
        max_length=max_len, vocab_size=SIZES[a.model_size]["vocab_size"])

    with tempfile.TemporaryDirectory(prefix="paft-bench-") as tmp:
        work = Path(tmp)
        n_params = build_model(a.model_size, tokenizer, work / "base")
        cfg = SIZES[a.model_size]
        print(f"paft training throughput: {a.model_size} Llama (hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, "
              f"{n_params / 1e6:.1f}M params), LoRA r={sft_cfg.lora.r} {sft_cfg.lora.target_modules}, batch {a.batch_size}, "
              f"{a.threads} torch thread(s), torch {torch.__version__}, transformers {transformers.__version__}, "
              f"trl {trl.__version__}, peft {peft.__version__}")
        print(f"each setting: {a.rounds} round(s) x ({a.warmup} warmup + {per_round} timed steps), settings alternate "
              f"order per round; tokens = real (non-pad) input tokens of the timed steps")
        for name, lens in (("SFT rows", sft_len), ("preference pairs (prompt + longer answer)", pref_len)):
            s = sorted(lens)
            print(f"data: {len(s)} {name}: tokens min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}, "
                  f"{sum(x > max_len for x in s)} over max_length {max_len}; {a.long_frac:.0%} with a long context")

        results = {}
        if a.only in (None, "sft"):
            results["sft"] = bench(sft_settings(work / "base", work, sft_rows, a.batch_size, sft_lr),
                                   a, total, per_round, lambda f, r, data: f(r), "padding_free", None, pairs=False)
        if a.only in (None, "dpo"):
            n = total * a.batch_size  # each round trains on its own pairs, each pair once
            slices = [pref_rows[r * n:(r + 1) * n] for r in range(a.rounds)]
            results["dpo"] = bench(dpo_settings(work / "base", work, a.batch_size, align_cfg.lr),
                                   a, total, per_round, lambda f, r, data: f(r, data), "padding_free", slices, pairs=True)

    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    verdicts = []
    if "sft" in results:
        runs, notes = results["sft"]
        table("SFT (completion-only loss; examples = sequences)", runs, "TRL defaults", "ex", notes)
        ratio = runs["paft, packing=True (ours)"].tok_s / runs["TRL defaults"].tok_s
        verdicts.append(f"SFT {ratio:.2f}x ({'met' if ratio >= AIM else 'NOT met'})")
    if "dpo" in results:
        runs, notes = results["dpo"]
        ours = runs["paft, precompute=True (ours)"]
        base = runs["TRL defaults"]
        default_cfg = align_cfg
        epochs = default_cfg.max_steps * default_cfg.batch_size / 400  # paft's default: 400 synthetic pairs
        extra = [
            ("  ours incl. precompute, 1 epoch", ours.tok_s_with_precompute(1.0), ours.examples / (ours.tokens / ours.tok_s_with_precompute(1.0))),
            (f"  ours incl. precompute, {epochs:g} epochs", ours.tok_s_with_precompute(epochs),
             ours.examples / (ours.tokens / ours.tok_s_with_precompute(epochs))),
        ]
        notes = notes + [
            f"precompute: {ours.precompute_s:.1f} s for {ours.precompute_pairs} pairs "
            f"({1000 * ours.precompute_per_pair:.1f} ms/pair, model hash included); the 'ours' row is per step only",
            f"'{epochs:g} epochs' = paft's default align run ({default_cfg.max_steps} steps x batch {default_cfg.batch_size} "
            "over the 400 synthetic pairs): the precompute is paid once per pair, the steps once per epoch",
        ]
        table("DPO (examples = pairs; each step trains on chosen + rejected rows)", runs, "TRL defaults", "pairs",
              notes, extra)
        r_steady = ours.tok_s / base.tok_s
        r_once = ours.tok_s_with_precompute(1.0) / base.tok_s
        verdicts.append(f"DPO {r_once:.2f}x incl. precompute with each pair once ({'met' if r_once >= AIM else 'NOT met'}), "
                        f"{r_steady:.2f}x per step")
    print(f"\nAim: >= {AIM}x over TRL defaults on padded data (tokens/s): " + "; ".join(verdicts))
    return 0


def bench(settings, a, total, per_round, call, attr, slices, pairs):
    """Probe the optional settings, then run the rest in alternating order; ``{name: Run}`` and notes."""
    notes = []
    active = []
    for name, factory, role in settings:
        if role == "probe":
            why = probe(call(factory, 0, slices[0] if slices else None), attr)
            if why:
                notes.append(f"'{name}' skipped: {why}")
                continue
        active.append((name, factory))
    runs = {name: Run() for name, _ in active}
    for r in range(a.rounds):
        order = active if r % 2 == 0 else active[::-1]
        for name, factory in order:
            t = time.perf_counter()
            run_once(call(factory, a.seed + r, slices[r] if slices else None), total, a.warmup, runs[name], pairs)
            print(f"  round {r + 1}/{a.rounds} {name:42} {runs[name].per_round[-1]:8.0f} tok/s "
                  f"(run {time.perf_counter() - t:5.1f} s)", flush=True)
    return runs, notes


if __name__ == "__main__":
    sys.exit(main())
