"""Training jobs: bad rows, L1 penalty, alignment methods, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paft.config import load_params
from paft.errors import DataError, JobKilled, StageError
from paft.io import read_json
from paft.models import train_tokenizer
from paft.train.l1 import L1Penalty
from paft.train.launch import training_job
from paft.train.rows import check_rows
from tests.conftest import write_params

TOK = train_tokenizer(["Answer: yes. Glad to help! Whatever. The capital of Zorvia is mibba."] * 10, 300)


def test_bad_preference_rows_are_errors_naming_file_and_row_by_default():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError, match=r"^pref.jsonl: row 2: field 'rejected' is missing"):
        check_rows("preference", rows, "pref.jsonl", TOK, 64, "error")


def test_bad_rows_are_dropped_and_counted_when_configured():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": " ", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": ""},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p " * 80, "chosen": "a", "rejected": "b"},
    ]
    kept, dropped = check_rows("preference", rows, "pref.jsonl", TOK, 64, "drop")
    assert kept == [{**rows[0], "length": 2}]  # prompt + longest answer, in tokens
    assert dropped == {"missing_field": 1, "empty_chosen": 1, "empty_rejected": 1, "chosen_equals_rejected": 1, "too_long": 1}
    with pytest.raises(DataError, match=r"row 1: .* longer than max_length 64"):
        check_rows("sft", [{"prompt": "p " * 80, "completion": "c"}], "sft.jsonl", TOK, 64, "error")
    with pytest.raises(DataError, match="no usable training rows"):
        check_rows("sft", [{"prompt": "p", "completion": ""}], "sft.jsonl", TOK, 64, "drop")


def _lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    return model


def test_l1_penalty_on_the_delta_is_the_mean_absolute_product_and_has_gradients():
    model = _lora_model()
    pen = L1Penalty(model, "delta")
    expected, count = 0.0, 0
    for _, a, b, scale in pen.lora:
        d = (b @ a) * scale
        expected += d.abs().sum().item()
        count += d.numel()
    value = pen()
    assert value.item() == pytest.approx(expected / count, rel=1e-5)
    value.backward()
    assert all(a.grad is not None and b.grad is not None for _, a, b, _ in pen.lora)
    factors = L1Penalty(model, "factors")()
    direct = sum(a.abs().sum() + b.abs().sum() for _, a, b, _ in pen.lora) / sum(a.numel() + b.numel() for _, a, b, _ in pen.lora)
    assert factors.item() == pytest.approx(direct.item(), rel=1e-5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from paft.data.prepare import prepare
    from paft.models import ensure_base

    folder = tmp_path_factory.mktemp("train")
    params = load_params(write_params(folder))
    data = prepare(params)
    return folder, params, data, ensure_base(params, data["path"])["path"]


def _run(job, timeout=600):
    path = Path(job.out).parent / f"{Path(job.out).name}.job.json"
    job.save(path)
    return subprocess.run([sys.executable, "-m", "paft.train", str(path)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def kill_at_checkpoint(job, job_file: Path, step: int = 8, log=subprocess.DEVNULL, env: dict | None = None) -> int:
    """Run ``job`` as ``python -m paft.train``, SIGKILL it once checkpoint-``step`` appears; returns the last
    complete checkpoint's step (the kill may land while that checkpoint is being written)."""
    job.save(job_file)
    proc = subprocess.Popen([sys.executable, "-m", "paft.train", str(job_file)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list(job.checkpoints.glob(f"checkpoint-{step}")):
        time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return max(int(c.name.split("-")[1]) for c in job.checkpoints.glob("checkpoint-*")
               if (c / "trainer_state.json").is_file())


def test_l1_sft_logs_penalty_apart_and_makes_the_delta_sparser(prepared):
    from paft.merge.deltas import load_deltas

    folder, params, data, base = prepared
    sums = {}
    for weight in (0.0, 50.0):
        p = load_params(write_params(folder / f"l1-{weight}", {"train": {"sft": {"max_steps": 12, "lr": 0.01, "l1": {"weight": weight}}}}))
        job = training_job("sft", p, base, Path(data["path"]) / "sft.jsonl", folder / f"sft-l1-{weight}")
        proc = _run(job)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        summary = read_json(folder / f"sft-l1-{weight}" / "summary.json")
        logged = [h for h in summary["log_history"] if "loss" in h]
        if weight:
            assert all("l1_penalty" in h and "task_loss" in h for h in logged)
        deltas = load_deltas(base, folder / f"sft-l1-{weight}")
        sums[weight] = sum(d.abs().sum().item() for d in deltas.values()) / sum(d.numel() for d in deltas.values())
    assert sums[50.0] < 0.5 * sums[0.0], sums


@pytest.mark.slow
@pytest.mark.parametrize("method, loss", [("dpo", "ipo"), ("dpo", "hinge"), ("dpo", "robust"), ("orpo", "sigmoid")])
def test_alignment_methods_train(prepared, method, loss):
    folder, params, data, base = prepared
    p = load_params(write_params(folder / f"{method}-{loss}", {"train": {"align": {
        "method": method, "loss_type": loss, "max_steps": 2, "label_smoothing": 0.1 if loss == "robust" else 0.0}}}))
    out = folder / f"align-{method}-{loss}"
    proc = _run(training_job("align", p, base, Path(data["path"]) / "preference.jsonl", out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = read_json(out / "summary.json")
    assert summary["steps"] == 2 and summary["method"] == method
    assert (out / "adapter_model.safetensors").is_file() and not (out / "training_args.bin").exists()


@pytest.mark.slow
def test_precomputed_reference_log_probs(prepared):
    folder, params, data, base = prepared
    p = load_params(write_params(folder / "pre", {"train": {"align": {"precompute_ref_log_probs": True, "max_steps": 2}}}))
    proc = _run(training_job("align", p, base, Path(data["path"]) / "preference.jsonl", folder / "align-pre"))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigkilled_job_resumes_from_its_last_checkpoint_with_the_same_step_count(prepared):
    folder, params, data, base = prepared
    steps = 24
    p = load_params(write_params(folder / "resume", {"train": {"sft": {"max_steps": steps, "save_steps": 4, "logging_steps": 4}}}))
    out = folder / "sft-resume"
    job = training_job("sft", p, base, Path(data["path"]) / "sft.jsonl", out)
    done = kill_at_checkpoint(job, folder / "sft-resume.job.json")
    assert not out.exists()  # no partial output
    assert 4 <= done < steps
    rerun = _run(job)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = read_json(out / "summary.json")
    assert summary["steps"] == steps and summary["resumed_from"] == f"checkpoint-{done}"
    assert [h["step"] for h in summary["log_history"] if "loss" in h][-1] == steps
    assert not job.checkpoints.exists()  # cleaned up once whole


@pytest.mark.slow
def test_a_killed_training_task_is_retried_and_resumes_from_its_checkpoint(prepared, prefect_harness):
    """SIGKILL of the training subprocess mid-run: the Prefect task fails with JobKilled, its retry resumes."""
    import threading

    import psutil
    from prefect import flow

    from paft.tracking import Tracker
    from tasks import stages

    folder, _, data, base = prepared
    p = load_params(write_params(folder / "retry", {"train": {"sft": {"max_steps": 24, "save_steps": 4, "logging_steps": 4}}}))
    run_dir = folder / "retry-run"
    killed = []

    def kill_at_checkpoint_8():
        deadline = time.time() + 300
        while time.time() < deadline and not list((run_dir / "sft.checkpoints").glob("checkpoint-8")):
            time.sleep(0.2)
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(run_dir / "sft.job.json") == a for a in proc.info["cmdline"] or []):
                proc.kill()
                killed.append(proc.pid)

    parent = Tracker.from_params(p).start("retry-test")

    @flow
    def train_once():
        return stages.train_sft.with_options(retry_delay_seconds=0)(p, {"path": base}, data, str(run_dir), parent)

    threading.Thread(target=kill_at_checkpoint_8, daemon=True).start()
    summary = train_once()
    assert killed, "the job finished before it could be killed"
    assert summary["steps"] == 24 and 4 <= int(summary["resumed_from"].split("-")[1]) < 24  # a retry, resumed
    assert stages.killed(None, None, type("S", (), {"data": StageError("x")})()) is False  # real errors fail at once


def test_multi_gpu_jobs_are_launched_with_accelerate():
    from paft.train.launch import command

    assert command("job.json", "py") == ["py", "-m", "paft.train", "job.json"]
    assert command("job.json", "py", gpus=1) == ["py", "-m", "paft.train", "job.json"]
    cmd = command("job.json", "py", gpus=4, accelerate_config="infra/accelerate/deepspeed_zero2.yaml")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--config_file") + 1].endswith("zero2.yaml")
    assert cmd[-3:] == ["-m", "paft.train", "job.json"]


FAKE_TRAINER = """#!/usr/bin/env python3
# stands in for the interpreter: records the environment its job got, holds it a moment, writes the summary
import json, os, sys, time
job = json.load(open(sys.argv[-1]))
os.makedirs(job["out"], exist_ok=True)
start = time.time()
time.sleep(0.5)
json.dump({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "port": os.environ["MASTER_PORT"], "argv": sys.argv[1:],
           "start": start, "end": time.time()}, open(os.path.join(job["out"], "summary.json"), "w"))
"""


def test_concurrent_jobs_get_disjoint_gpus_and_their_own_ports(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from paft.errors import PaftError
    from paft.train.launch import DeviceLeases, launch

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    params = load_params(write_params(tmp_path))
    devices = DeviceLeases(["0", "1", "2", "3"])
    jobs = [training_job(kind, params, "base", "data.jsonl", tmp_path / f"out{i}") for i, kind in
            enumerate(("sft", "align", "sft"))]
    with ThreadPoolExecutor(3) as pool:  # three jobs of two GPUs each on four GPUs: the third waits for one
        runs = list(pool.map(lambda j: launch(j, str(fake), gpus=2, devices=devices), jobs))
    sets = [set(r["cuda"].split(",")) for r in runs]
    assert all(len(s) == 2 for s in sets) and all(r["argv"][:2] == ["-m", "accelerate.commands.launch"] for r in runs)
    for a in range(3):
        for b in range(a + 1, 3):
            overlap = runs[a]["start"] < runs[b]["end"] and runs[b]["start"] < runs[a]["end"]
            assert not (overlap and sets[a] & sets[b]), "two running jobs shared a GPU"
            assert not overlap or runs[a]["port"] != runs[b]["port"]
    assert sum(runs[a]["start"] < runs[b]["end"] and runs[b]["start"] < runs[a]["end"]
               for a in range(3) for b in range(a + 1, 3)) >= 1  # two of them did run at once
    suicide = tmp_path / "killed-python"
    suicide.write_text("#!/usr/bin/env python3\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    suicide.chmod(0o755)
    with pytest.raises(JobKilled, match="sft training was killed by signal 9 .* resumes from its last checkpoint"):
        launch(jobs[0], str(suicide), devices=devices)
    cpu = launch(jobs[0], str(fake), gpus=0, devices=devices)
    assert cpu["cuda"] is None and cpu["port"]  # CPU jobs keep the environment's devices
    with pytest.raises(PaftError, match="gpus_per_job is 8, but this machine has 4 GPU"):
        launch(jobs[0], str(fake), gpus=8, devices=devices)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one():
    from paft.data.formats import format_prompt, training_example

    tok = train_tokenizer(["hello"] * 5, 300)
    assert format_prompt("Q?", tok) == "### Instruction:\nQ?\n\n### Response:\n"
    tok.chat_template = CHAT_TEMPLATE
    assert format_prompt("Q?", tok) == "<|user|>\nQ?</s>\n<|assistant|>\n"
    assert format_prompt("REC prompt", tok, plain_template=False) == "<|user|>\nREC prompt</s>\n<|assistant|>\n"
    ex = training_example("preference", {"prompt": "Q?", "chosen": "a", "rejected": "b"}, tok)
    assert ex["chosen"] == [{"role": "assistant", "content": "a"}] and ex["prompt"][0]["role"] == "user"


@pytest.mark.slow
def test_sft_and_dpo_train_on_a_chat_model(prepared):
    import shutil

    from transformers import AutoTokenizer

    folder, params, data, base = prepared
    chat_base = folder / "chat-base"
    shutil.copytree(base, chat_base, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(chat_base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(chat_base)
    p = load_params(write_params(folder / "chat", {"train": {"sft": {"max_steps": 2}, "align": {"max_steps": 2}}}))
    for kind, file in (("sft", "sft.jsonl"), ("align", "preference.jsonl")):
        out = folder / f"chat-{kind}"
        proc = _run(training_job(kind, p, str(chat_base), Path(data["path"]) / file, out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert read_json(out / "summary.json")["steps"] == 2
