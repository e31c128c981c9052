"""Scale-out configuration: DeepSpeed JSONs (infra/deepspeed), accelerate configs (infra/accelerate), the
Mistral-7B profile (profiles/paft-mistral-7b.yaml) and one real DeepSpeed step per job on CPU.

DeepSpeed is optional. Without a CUDA toolkit it installs from its source distribution with no compiled ops
and without replacing the CPU torch build:

    DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation deepspeed

The tests that need it are skipped (saying so) when it is not installed.
"""

from __future__ import annotations

import copy
import json
import socket
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from paft.config import load_params
from tests.conftest import ROOT

DS_DIR = ROOT / "infra" / "deepspeed"
ACC_DIR = ROOT / "infra" / "accelerate"
PROFILE = ROOT / "profiles" / "paft-mistral-7b.yaml"
DS_CONFIGS = {"zero2": 2, "zero3": 3, "zero3_offload": 3}
ACCELERATE_CONFIGS = ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3"]
INSTALL = "DS_BUILD_OPS=0 .venv/bin/pip install --no-build-isolation deepspeed"


def _need_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:  # not installed, or installed but broken
        pytest.skip(f"deepspeed cannot be imported ({e}); install it with: {INSTALL}")


def _project_path(p: str) -> Path:
    """A path as the training process sees it: it runs in the project root (where `paft run` is started)."""
    q = Path(p)
    return q if q.is_absolute() else ROOT / q


def _autos(obj, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


# ----------------------------------------------------------------------------- DeepSpeed JSON
@pytest.mark.parametrize("name", sorted(DS_CONFIGS))
def test_deepspeed_json_is_an_hf_auto_config(name):
    cfg = json.loads((DS_DIR / f"{name}.json").read_text())
    z = cfg["zero_optimization"]
    assert z["stage"] == DS_CONFIGS[name]
    # the batch, accumulation, clipping and precision come from the trainer's arguments
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", key
    assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto"
    assert "optimizer" not in cfg and "scheduler" not in cfg  # the trainer's AdamW + cosine schedule
    assert z["reduce_bucket_size"] == "auto"
    if z["stage"] == 3:
        assert z["stage3_gather_16bit_weights_on_model_save"] is True  # save_pretrained writes whole weights
        assert z["stage3_prefetch_bucket_size"] == "auto" and z["stage3_param_persistence_threshold"] == "auto"
    else:
        assert z["overlap_comm"] is True and z["contiguous_gradients"] is True


@pytest.mark.parametrize("name", sorted(DS_CONFIGS))
def test_deepspeed_parses_each_config_once_hf_fills_the_autos(name, tmp_path):
    """What the HF integration does with the file (fill "auto" from TrainingArguments and the model's
    hidden size), then DeepSpeed's own config parser on the result."""
    _need_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             bf16=True, use_cpu=True, max_steps=100, warmup_steps=10, report_to="none")
    hf = HfTrainerDeepSpeedConfig(str(DS_DIR / f"{name}.json"))
    try:
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=4096)), 100)
        assert _autos(hf.config) == []
        ds = DeepSpeedConfig(copy.deepcopy(hf.config))
    finally:
        unset_hf_deepspeed_config()  # the integration keeps a global reference: don't leak ZeRO-3 into other tests
    assert ds.zero_optimization_stage == DS_CONFIGS[name]
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (4, 4, 16)
    assert ds.gradient_clipping == args.max_grad_norm
    assert hf.config["bf16"]["enabled"] is True and hf.config["fp16"]["enabled"] is False
    assert ds.zero_config.reduce_bucket_size == 4096 * 4096
    if DS_CONFIGS[name] == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save
    if name.endswith("offload"):
        assert ds.zero_config.offload_param.device == "cpu" and ds.zero_config.offload_optimizer.device == "cpu"


# ----------------------------------------------------------------------------- accelerate YAML
@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_config_parses_and_num_processes_is_overridable(name, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACC_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#") and "accelerate launch --config_file" in path.read_text()
    # what the job launcher runs (from the project root), parsed by accelerate itself
    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(
        ["--config_file", str(path.relative_to(ROOT)), "--num_processes", "3", "-m", "paft.train", "job.json"])
    args, _, mp_from_config = _validate_launch_command(args)
    assert args.num_processes == 3 and args.module and args.training_script == "paft.train"
    if raw["distributed_type"] == "DEEPSPEED":
        assert args.use_deepspeed
        ds_file = raw["deepspeed_config"]["deepspeed_config_file"]
        # accelerate hands the path unchanged to the training processes, which run in the project root
        assert not Path(ds_file).is_absolute() and _project_path(ds_file).is_file(), ds_file
        assert Path(ds_file).stem == name.removeprefix("deepspeed_")
        # accelerate refuses a mixed_precision from the config file together with a deepspeed_config_file
        assert "mixed_precision" not in raw and not mp_from_config
    else:
        assert raw["distributed_type"] == "MULTI_GPU" and args.multi_gpu and args.mixed_precision == "bf16"


# ----------------------------------------------------------------------------- the 7B profile
def test_mistral_7b_profile_is_complete_and_consistent():
    from paft.config import Params
    from paft.data.sources import FORMATS
    from paft.train.launch import training_job

    raw = yaml.safe_load(PROFILE.read_text())
    missing = set(Params.model_fields) - {"root"} - set(raw)
    assert not missing, f"{PROFILE.name} lacks the section(s) {sorted(missing)}"  # every section, spelled out
    p = load_params(PROFILE)
    assert p.model.base == "mistralai/Mistral-7B-v0.1" and p.model.dtype == "bfloat16"
    hub = {(s.name, s.split, s.format) for s in p.data.sources if s.kind == "hub"}
    assert hub == {("HuggingFaceH4/ultrachat_200k", "train_sft", "messages"),
                   ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "ultrafeedback_binarized")}
    assert FORMATS["messages"][0] == "sft" and FORMATS["ultrafeedback_binarized"][0] == "preference"
    assert p.merge.methods[0] == "ties" and p.train.align.method == "dpo"
    # the comparison: plain SFT beside L1-sparse SFT and ORPO beside DPO; both SFT jobs merged; leaderboard tasks
    assert p.train.sft.l1.weight == 0 and p.train.job("sft_l1")[1].l1.weight > 0 and p.train.job("orpo")[1].method == "orpo"
    assert p.merge.sft == ["sft", "sft_l1"] and p.merge.search.budget > 0
    assert {t.split(":")[0] for t in p.evaluate.harness_tasks} == {"arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2",
                                                                    "winogrande", "gsm8k"}
    assert p.resources.gpus_per_job > 1
    # resources.accelerate_config resolves against the params file's folder (tasks/stages.py)
    acc_path = p.path(p.resources.accelerate_config)
    assert acc_path.is_file(), acc_path
    acc_ds = _project_path(yaml.safe_load(acc_path.read_text())["deepspeed_config"]["deepspeed_config_file"])
    for kind in ("sft", "align", "rec"):
        job = training_job(kind, p, p.model.base, "data.jsonl", "out")
        assert job.dtype == "bfloat16" and job.cfg["finetune"] == "lora" and job.cfg["gradient_checkpointing"]
        # train.*.deepspeed resolves against the params file's folder, like every path there
        ds = job.cfg["deepspeed"]
        assert ds and Path(ds).is_absolute() and Path(ds).is_file(), f"{kind}: deepspeed config {ds} not found"
        assert _project_path(ds).resolve() == acc_ds.resolve(), "accelerate config and train.*.deepspeed differ"
    assert p.train.sft.max_length == 2048
    # paths stay inside the project although they resolve against profiles/
    for q in (p.paths.data_dir, p.paths.output_dir, p.tracking.artifact_location):
        assert p.path(q).resolve().is_relative_to(ROOT), q
    assert p.tracking_uri == f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"


# ----------------------------------------------------------------------------- one DeepSpeed step on CPU
# Runs inside `python -m paft.train`: reports the engine DeepSpeed built, and skips the optional
# shared-memory all-reduce kernel of the CPU accelerator (a C++ extension that would be JIT-compiled,
# ~50 s, the first time; one process never all-reduces across processes).
PROBE = """\
import importlib, runpy, sys
import deepspeed
# (not `import deepspeed.comm.torch as m`: that finds the name `torch` that deepspeed.comm re-exports)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
_initialize = deepspeed.initialize
def initialize(*args, **kwargs):
    out = _initialize(*args, **kwargs)
    e = out[0]
    print(f"DS-PROBE engine={type(e).__name__} rank={e.global_rank} world={e.world_size} "
          f"zero_stage={e.zero_optimization_stage()}", flush=True)
    return out
deepspeed.initialize = initialize
args = sys.argv[1:]
if args[:2] == ["-m", "paft.train"]:
    args = args[2:]
sys.argv = ["paft.train", *args]
runpy.run_module("paft.train", run_name="__main__", alter_sys=True)
"""

# (job kind, DeepSpeed config): the two PAFT jobs under ZeRO-2 (the profile's choice; SFT with the L1 penalty
# on), and DPO under ZeRO-3 (TRL gathers the partitioned lm_head for its fused log-prob head)
RUNS = [("sft", "zero2"), ("align", "zero2"), ("align", "zero3")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """The runs of RUNS, at the same time (as the flow runs SFT ‖ DPO), each one optimizer step on CPU in one
    DeepSpeed process, through paft's own job launcher."""
    _need_deepspeed()
    from paft.config import TinyModelConfig
    from paft.models import build_tiny, train_tokenizer
    from paft.train.launch import launch, training_job

    folder = tmp_path_factory.mktemp("deepspeed")
    sft = [{"prompt": f"Add {i} and {i}.", "completion": f" {2 * i}"} for i in range(16)]
    pref = [{"prompt": f"Add {i} and {i}.", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(16)]
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in sft], 300)
    model = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2), tok)
    model.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    for name, rows in (("sft", sft), ("preference", pref)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "probe.py").write_text(PROBE)
    wrapper = folder / "python"  # launch() runs `<python> -m paft.train JOB.json`
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{folder / "probe.py"}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    (folder / "params.yaml").write_text("{}\n")

    def run(kind: str, ds: str) -> tuple[dict, str, Path]:
        section = f"train.{kind}"
        p = load_params(folder / "params.yaml", [
            f"{section}.{kv}" for kv in ("max_steps=1", "batch_size=2", "warmup_steps=0", "logging_steps=1",
                                          "max_length=128", "lora.r=4", "lora.alpha=8",
                                          f"deepspeed={DS_DIR / f'{ds}.json'}")
        ] + (["train.sft.l1.weight=50"] if kind == "sft" else []) + ["resources.cpu_threads=1"])
        data = folder / ("sft.jsonl" if kind == "sft" else "preference.jsonl")
        out = folder / f"{kind}-{ds}"
        env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1"}
        summary = launch(training_job(kind, p, folder / "base", data, out), python=str(wrapper), env=env)
        return summary, (folder / f"{out.name}.log").read_text(errors="replace"), out

    with ThreadPoolExecutor(len(RUNS)) as pool:
        futures = {r: pool.submit(run, *r) for r in RUNS}
        return {r: f.result() for r, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind, ds", RUNS)
def test_one_deepspeed_zero_step_on_cpu(deepspeed_runs, kind, ds):
    from safetensors.torch import load_file

    summary, log, out = deepspeed_runs[(kind, ds)]
    assert f"DS-PROBE engine=DeepSpeedEngine rank=0 world=1 zero_stage={DS_CONFIGS[ds]}" in log, log[-3000:]
    assert summary["kind"] == kind and summary["steps"] == 1 and summary["train_loss_first"] > 0
    if kind == "sft":
        assert "l1_penalty" in summary["log_history"][0]
    weights = load_file(out / "adapter_model.safetensors")
    assert weights and all(v.numel() > 0 for v in weights.values())  # ZeRO-3: gathered whole on save
    assert all(v.shape[0] == 4 for k, v in weights.items() if "lora_A" in k)
    assert all(v.shape[1] == 4 for k, v in weights.items() if "lora_B" in k)
    # B starts at zero: a non-zero B is the optimizer step DeepSpeed took
    assert sum(v.abs().sum().item() for k, v in weights.items() if "lora_B" in k) > 0


# ----------------------------------------------------------------------------- the REC paper's profiles
# REC (arXiv:2411.02448): REC-12B = LoRA on Mistral-Nemo-12B, REC-70B = 4-bit QLoRA on Llama-3.1-70B
REC_PROFILES = {
    "rec-12b": dict(base="mistralai/Mistral-Nemo-Base-2407", r=256, alpha=128, lr=1e-4, epochs=2, max_length=6144,
                    quantization="none"),
    "rec-70b": dict(base="meta-llama/Llama-3.1-70B-Instruct", r=64, alpha=32, lr=2e-4, epochs=1, max_length=4096,
                    quantization="4bit"),
}


@pytest.mark.parametrize("name", sorted(REC_PROFILES))
def test_rec_profile_carries_the_papers_numbers(name):
    from paft.config import Params
    from paft.train.common import trainer_args
    from paft.train.launch import training_job

    path = ROOT / "profiles" / f"{name}.yaml"
    want = REC_PROFILES[name]
    raw = yaml.safe_load(path.read_text())
    missing = set(Params.model_fields) - {"root"} - set(raw)
    assert not missing, f"{path.name} lacks the section(s) {sorted(missing)}"  # every section, spelled out
    assert "arXiv:2411.02448" in path.read_text()
    p = load_params(path)
    assert p.model.base == want["base"] and p.model.dtype == "bfloat16"
    rec = p.rec
    assert (rec.lora.r, rec.lora.alpha, rec.lr, rec.epochs, rec.max_steps, rec.max_length, rec.quantization) == (
        want["r"], want["alpha"], want["lr"], want["epochs"], None, want["max_length"], want["quantization"])
    assert rec.finetune == "lora" and rec.base == "merged"
    # DeepSpeed ZeRO-2 for every training job, and the accelerate config launches the same stage
    acc_path = p.path(p.resources.accelerate_config)
    assert acc_path.is_file(), acc_path
    acc_ds = _project_path(yaml.safe_load(acc_path.read_text())["deepspeed_config"]["deepspeed_config_file"])
    for kind in ("sft", "align", "rec"):
        job = training_job(kind, p, p.model.base, "data.jsonl", "out")
        ds = job.cfg["deepspeed"]
        assert ds and Path(ds).is_file() and Path(ds).name == "zero2.json", f"{kind}: {ds}"
        assert Path(ds).resolve() == acc_ds.resolve() and json.loads(Path(ds).read_text())["zero_optimization"]["stage"] == 2
        assert job.dtype == "bfloat16" and job.cfg["finetune"] == "lora" and job.cfg["gradient_checkpointing"]
        args = trainer_args(job)
        assert args["bf16"] is True and args["fp16"] is False
        if kind == "rec":
            assert args["num_train_epochs"] == want["epochs"] and args["max_steps"] == -1
            assert args["learning_rate"] == want["lr"] and args["max_length"] == want["max_length"]
        else:  # the PAFT stages run a fixed number of steps
            assert args["max_steps"] > 0 and "num_train_epochs" not in args
    # the 70B base does not fit ZeRO-2 in bf16: every job is QLoRA
    if want["quantization"] == "4bit":
        assert p.train.sft.quantization == p.train.align.quantization == "4bit"
    assert {s.builder for s in rec.sources} == {"helpsteer2", "skywork", "offsetbias", "code_preference"}
    for q in (p.paths.data_dir, p.paths.output_dir, p.tracking.artifact_location):
        assert p.path(q).resolve().is_relative_to(ROOT), q
    assert p.tracking_uri == f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"


@pytest.mark.parametrize("section", ["train.sft", "train.align", "rec"])
def test_epochs_and_max_steps_together_are_rejected_naming_the_key(tmp_path, section):
    from paft.errors import ConfigError
    from tests.conftest import write_params

    path = write_params(tmp_path)  # sets max_steps in every section
    with pytest.raises(ConfigError, match=rf"{section}\.epochs: epochs and max_steps are both set"):
        load_params(path, [f"{section}.epochs=2"])
    # max_steps: null switches a section from steps to epochs
    p = load_params(path, [f"{section}.epochs=2", f"{section}.max_steps=null"])
    cfg = {"train.sft": p.train.sft, "train.align": p.train.align, "rec": p.rec}[section]
    assert cfg.epochs == 2 and cfg.max_steps is None
    with pytest.raises(ConfigError, match=rf"{section}\.max_steps: give max_steps or epochs"):
        load_params(path, [f"{section}.max_steps=null"])
    with pytest.raises(ConfigError, match=rf"{section}\.epochs"):
        load_params(path, [f"{section}.epochs=0", f"{section}.max_steps=null"])


def test_epochs_default_off_and_steps_unchanged():
    from paft.config import RecConfig, SFTTrainConfig

    assert SFTTrainConfig().max_steps == 200 and SFTTrainConfig().epochs is None
    assert RecConfig().max_steps == 300 and RecConfig(epochs=1.5).max_steps is None
    assert SFTTrainConfig().quantization == "none"


@pytest.mark.parametrize("section", ["train.sft", "train.align", "rec"])
def test_quantization_needs_lora(tmp_path, section):
    from paft.errors import ConfigError
    from tests.conftest import write_params

    path = write_params(tmp_path)
    with pytest.raises(ConfigError, match=rf"{section}\.quantization: quantization 4bit \(QLoRA\) needs finetune: lora"):
        load_params(path, [f"{section}.quantization=4bit", f"{section}.finetune=full"])
    with pytest.raises(ConfigError, match=rf"{section}\.quantization"):
        load_params(path, [f"{section}.quantization=2bit"])
    assert load_params(path, [f"{section}.quantization=8bit"]) is not None  # lora is the default


def test_trainer_args_run_epochs_or_steps(tmp_path):
    from paft.errors import PaftError
    from paft.train.common import make_config, run_length, trainer_args
    from paft.train.launch import training_job
    from tests.conftest import write_params

    p = load_params(write_params(tmp_path), ["rec.epochs=2", "rec.max_steps=null", "train.sft.epochs=0.5",
                                             "train.sft.max_steps=null"])
    for kind in ("rec", "sft"):
        args = trainer_args(training_job(kind, p, "base", "data.jsonl", tmp_path / kind))
        assert args["max_steps"] == -1 and args["num_train_epochs"] == (2.0 if kind == "rec" else 0.5)
    args = trainer_args(training_job("align", p, "base", "data.jsonl", tmp_path / "align"))
    assert args["max_steps"] == 6 and "num_train_epochs" not in args
    # the arguments build a real trainer config: epochs, and no step limit
    from trl import SFTConfig

    cfg = make_config(SFTConfig, **trainer_args(training_job("rec", p, "base", "data.jsonl", tmp_path / "rec")),
                      use_cpu=True)
    assert cfg.num_train_epochs == 2.0 and cfg.max_steps == -1
    # job files written before `epochs` existed still run by steps; a hand-edited one with both fails
    assert run_length({"max_steps": 7}) == {"max_steps": 7}
    with pytest.raises(PaftError, match="both set"):
        run_length({"max_steps": 7, "epochs": 1})


def _cuda_and_bitsandbytes() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_without_cuda_or_bitsandbytes_fails_in_one_line(tmp_path, quantization):
    if _cuda_and_bitsandbytes():
        pytest.skip("this machine has a CUDA GPU and bitsandbytes: quantized loading is possible here")
    from paft.errors import PaftError
    from paft.models import load_model, quantization_config

    msg = f"quantization {quantization} needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)"
    assert quantization_config("none") is None
    for call in (lambda: quantization_config(quantization, "bfloat16"),
                 # checked before the model is read: the path need not exist
                 lambda: load_model(str(tmp_path / "no-such-model"), "bfloat16", quantization=quantization)):
        with pytest.raises(PaftError) as e:
            call()
        assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["sft", "align", "rec"])
def test_training_job_with_4bit_stops_before_training_on_this_machine(tmp_path, kind):
    """The training job loads its model with the section's quantization: on a machine without CUDA or
    bitsandbytes it stops with the one-line error, before reading the model or the data."""
    if _cuda_and_bitsandbytes():
        pytest.skip("this machine has a CUDA GPU and bitsandbytes: quantized loading is possible here")
    from paft.errors import PaftError
    from paft.train.align import train_align
    from paft.train.launch import training_job
    from paft.train.sft import train_sft
    from tests.conftest import write_params

    section = {"sft": "train.sft", "align": "train.align", "rec": "rec"}[kind]
    p = load_params(write_params(tmp_path), [f"{section}.quantization=4bit"])
    job = training_job(kind, p, tmp_path / "no-such-model", tmp_path / "no-such-data.jsonl", tmp_path / "out")
    assert job.cfg["quantization"] == "4bit"
    with pytest.raises(PaftError, match=r"quantization 4bit needs a CUDA GPU and bitsandbytes \(pip install bitsandbytes\)"):
        (train_align if kind == "align" else train_sft)(job, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not job.checkpoints.exists()
