"""lm-evaluation-harness on a loaded model (paft/evaluate/harness.py): local JSONL tasks, offline, checked against
log-likelihoods and greedy continuations computed here with the model itself."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket

import pytest
import torch

from paft.errors import ConfigError, DataError, PaftError
from paft.evaluate.harness import flat_metrics, jsonl_task, metric_name, parse_task_spec, run_harness
from paft.io import read_json

CONTEXT = "Question: {question}\nAnswer:"  # the prompt jsonl_task's tasks use; lm-eval puts " " before the target


@pytest.fixture
def no_network(monkeypatch):
    """Every connection or name lookup beyond loopback fails and is recorded (the test asserts there was none)."""
    attempts: list = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"network blocked in tests: {address}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            attempts.append(host)
            raise OSError(f"name lookup blocked in tests: {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.fixture(scope="module")
def sharp_lm(tiny_lm):
    """tiny_lm's model with its matrices drawn at std 0.5 rather than 0.02: at 0.02 its next-token distributions are
    nearly uniform and blind to the context, so a prompt other than the one expected would go unnoticed."""
    tok, model = tiny_lm
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return tok, model.eval()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the tokens of context+continuation beyond those of the context alone."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    logp = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` up to the first newline, without surrounding whitespace."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()


def mc_rows(model, tok, n_hit: int, n_miss: int) -> tuple[list[dict], float]:
    """Multiple-choice rows whose gold choice is the model's favourite (log-likelihood) in ``n_hit`` rows and its
    least favourite in ``n_miss``; also the acc_norm (per character) those rows should get. Rows where two choices
    score within 1e-3 are skipped, so the expected values do not hang on rounding."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink", "gold"]
    rows, norm_hits = [], []
    for i in range(40):
        if len(rows) == n_hit + n_miss:
            break
        question = f"Which colour is item {i}?"
        choices = [colours[(i + k * 5) % len(colours)] for k in range(3)]
        ll = [continuation_logprob(model, tok, CONTEXT.format(question=question), " " + c) for c in choices]
        per_char = [v / len(c) for v, c in zip(ll, choices)]
        if any(abs(a - b) < 1e-3 for s in (ll, per_char) for j, a in enumerate(s) for b in s[j + 1 :]):
            continue
        answer = max(range(3), key=ll.__getitem__) if len(rows) < n_hit else min(range(3), key=ll.__getitem__)
        rows.append({"question": question, "choices": choices, "answer": answer})
        norm_hits.append(max(range(3), key=per_char.__getitem__) == answer)
    assert len(rows) == n_hit + n_miss, "not enough rows with clear log-likelihood margins"
    return rows, sum(norm_hits) / len(norm_hits)


# --- specs and names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [("arc_challenge:25", ("arc_challenge", 25)), ("hellaswag", ("hellaswag", None)),
     ("truthfulqa_mc2:0", ("truthfulqa_mc2", 0)), (" mmlu:5 ", ("mmlu", 5)), ("my-task.v2", ("my-task.v2", None))],
)
def test_parse_task_spec(spec, expected):
    assert parse_task_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", ":5", "arc:", "arc:-1", "arc:two", "arc:2:3", "a/b", "arc 25"])
def test_parse_task_spec_rejects(spec):
    with pytest.raises(ConfigError, match="harness task") as e:
        parse_task_spec(spec)
    assert "\n" not in str(e.value)


def test_metric_names():
    assert metric_name("arc_challenge", "acc,none") == "harness_arc_challenge_acc"
    assert metric_name("arc_challenge", "acc_norm,none") == "harness_arc_challenge_acc_norm"
    assert metric_name("gsm8k", "exact_match,strict-match") == "harness_gsm8k_exact_match_strict-match"
    assert metric_name("gsm8k", "exact_match,flexible-extract") == "harness_gsm8k_exact_match_flexible-extract"
    assert metric_name("x", "acc_stderr,none") is None
    assert metric_name("x", "alias") is None
    assert metric_name("x", "f1,weird:filter(1)") == "harness_x_f1_weird_filter_1_"  # only MLflow-safe characters

    results = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01, "sample_len": 100},
            "mmlu_stem": {"alias": " - stem", "acc,none": 0.2},
            "gsm8k": {"exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": "N/A",
                      "exact_match,flexible-extract": 0.6},
            "winogrande": {"acc,none": 0.75, "flag,none": True},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem"], "gsm8k": [], "winogrande": []},
    }
    assert flat_metrics(results, ["mmlu", "gsm8k"]) == {
        "harness_mmlu_acc": 0.25,
        "harness_gsm8k_exact_match_strict-match": 0.5,
        "harness_gsm8k_exact_match_flexible-extract": 0.6,
    }
    # a requested tag is not reported under its name: its tasks are
    assert flat_metrics(results, ["some_tag"]) == {
        "harness_mmlu_acc": 0.25,
        "harness_gsm8k_exact_match_strict-match": 0.5,
        "harness_gsm8k_exact_match_flexible-extract": 0.6,
        "harness_winogrande_acc": 0.75,
    }


# --- local tasks, run through lm-eval ---------------------------------------------------------------------------


def test_multiple_choice_task_matches_direct_loglikelihoods(sharp_lm, tmp_path, no_network):
    tok, model = sharp_lm
    rows, acc_norm = mc_rows(model, tok, n_hit=4, n_miss=2)
    folder = jsonl_task("tiny_mc", write_rows(tmp_path / "mc.jsonl", rows), tmp_path / "tasks")
    import datasets  # (its import sets its logger's level)

    env = dict(os.environ)
    levels = {n: logging.getLogger(n).level for n in ("lm_eval", "datasets")}
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS

    m = run_harness(model, tok, ["tiny_mc"], include_paths=[folder], batch_size=4)

    assert set(m) == {"harness_tiny_mc_acc", "harness_tiny_mc_acc_norm"}
    assert 0.0 <= m["harness_tiny_mc_acc"] <= 1.0
    assert m["harness_tiny_mc_acc"] == pytest.approx(4 / 6)
    assert m["harness_tiny_mc_acc_norm"] == pytest.approx(acc_norm)
    assert no_network == []  # offline: not even datasets' download-count ping
    # the environment, lm-eval's and datasets' log levels and settings are as before
    assert dict(os.environ) == env
    assert {n: logging.getLogger(n).level for n in levels} == levels
    assert datasets.config.HF_UPDATE_DOWNLOAD_COUNTS == counts

    # a changed file under the same task name is read again (no stale dataset cache): now every gold is a miss
    for r in rows:
        ll = [continuation_logprob(model, tok, CONTEXT.format(question=r["question"]), " " + c) for c in r["choices"]]
        r["answer"] = min(range(3), key=ll.__getitem__)
    folder = jsonl_task("tiny_mc", write_rows(tmp_path / "mc.jsonl", rows), tmp_path / "tasks")
    assert run_harness(model, tok, ["tiny_mc"], include_paths=[folder])["harness_tiny_mc_acc"] == 0.0


def test_generation_task_exact_match_against_greedy_output(sharp_lm, tmp_path, no_network):
    tok, model = sharp_lm
    questions = ["Name the first thing.", "What comes next?", "Say something short, please."]
    own = [greedy(model, tok, CONTEXT.format(question=q), 8) for q in questions]
    assert all(own), own  # the model says something for each (else the check below proves little)
    rows = [{"question": questions[0], "answer": own[0]}, {"question": questions[1], "answer": f"  {own[1]} "},
            {"question": questions[2], "answer": own[2] + " and more"}]
    folder = jsonl_task("tiny_gen", write_rows(tmp_path / "gen.jsonl", rows), tmp_path / "tasks",
                        kind="generate_until", max_new_tokens=8)

    m = run_harness(model, tok, ["tiny_gen"], include_paths=[folder], batch_size=8)

    assert set(m) == {"harness_tiny_gen_exact_match"}
    assert 0.0 <= m["harness_tiny_gen_exact_match"] <= 1.0
    assert m["harness_tiny_gen_exact_match"] == pytest.approx(2 / 3)  # surrounding whitespace does not count
    assert no_network == []


def test_few_shot_per_task_and_raw_results(sharp_lm, tmp_path):
    tok, model = sharp_lm
    rows, _ = mc_rows(model, tok, n_hit=3, n_miss=2)
    folder = jsonl_task("tiny_mc", write_rows(tmp_path / "mc.jsonl", rows), tmp_path / "tasks")
    gen_rows = [{"question": r["question"], "answer": r["choices"][0]} for r in rows]
    jsonl_task("tiny_gen", write_rows(tmp_path / "gen.jsonl", gen_rows), folder, kind="generate_until", max_new_tokens=4)
    out = tmp_path / "out"

    m = run_harness(model, tok, ["tiny_mc:2", "tiny_gen"], include_paths=[folder], out_dir=out, limit=4)

    assert set(m) == {"harness_tiny_mc_acc", "harness_tiny_mc_acc_norm", "harness_tiny_gen_exact_match"}
    raw = read_json(out / "harness.json")
    assert raw["tasks"] == ["tiny_mc:2", "tiny_gen"]
    assert raw["n-shot"] == {"tiny_mc": 2, "tiny_gen": 0}
    assert raw["configs"]["tiny_mc"]["num_fewshot"] == 2
    assert raw["n-samples"]["tiny_mc"] == {"original": 5, "effective": 4}  # limit
    assert raw["results"]["tiny_mc"]["acc,none"] == m["harness_tiny_mc_acc"]
    assert raw["config"]["fewshot_seed"] == 1234
    assert not list(out.glob("*.tmp-*"))


def test_local_group_reports_the_group(sharp_lm, tmp_path):
    tok, model = sharp_lm
    rows, _ = mc_rows(model, tok, n_hit=3, n_miss=1)
    folder = tmp_path / "tasks"
    jsonl_task("part_a", write_rows(tmp_path / "a.jsonl", rows[:2]), folder)
    jsonl_task("part_b", write_rows(tmp_path / "b.jsonl", rows[2:]), folder)
    (folder / "_group.yaml").write_text("group: both_parts\ntask: [part_a, part_b]\naggregate_metric_list:\n"
                                        "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1\n")

    m = run_harness(model, tok, ["both_parts"], include_paths=[folder], out_dir=tmp_path / "out")

    assert m == {"harness_both_parts_acc": pytest.approx(3 / 4)}  # the group only, not its tasks
    raw = read_json(tmp_path / "out" / "harness.json")
    assert raw["results"]["part_a"]["acc,none"] == 1.0 and raw["results"]["part_b"]["acc,none"] == 0.5


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks (about 10 s here)
def test_unknown_task_names_it_and_where_tasks_are_looked_up(tiny_lm, tmp_path):
    tok, model = tiny_lm
    rows = [{"question": "q", "choices": ["a", "b"], "answer": 0}]
    folder = jsonl_task("tiny_mc", write_rows(tmp_path / "mc.jsonl", rows), tmp_path / "tasks")
    with pytest.raises(ConfigError) as e:
        run_harness(model, tok, ["tiny_mc", "tiny_mcq:3"], include_paths=[folder])
    msg = str(e.value)
    assert "'tiny_mcq'" in msg and str(folder) in msg and "built-in" in msg and "did you mean tiny_mc" in msg
    assert "\n" not in msg


def test_bad_task_lists(tiny_lm, tmp_path):
    tok, model = tiny_lm
    assert run_harness(model, tok, []) == {}
    with pytest.raises(ConfigError, match="more than once"):
        run_harness(model, tok, ["a:1", "a:2"])
    with pytest.raises(ConfigError, match="no such folder"):
        run_harness(model, tok, ["a"], include_paths=[tmp_path / "missing"])


OK_MC = '{"question": "q", "choices": ["a", "b"], "answer": 0}'


@pytest.mark.parametrize(
    "kind, lines, line, match",
    [
        ("multiple_choice", [OK_MC, '{"question": "q", "choices": ["a", "b"], "answer": 1'], 2, "malformed JSON"),
        ("multiple_choice", [OK_MC, "", '{"question": "q", "answer": 0}'], 3, "missing field 'choices'"),
        ("multiple_choice", ['{"question": "q", "choices": ["a", "b"], "answer": 2}'], 1, "not an index"),
        ("multiple_choice", ['{"question": "q", "choices": ["a", "b"], "answer": true}'], 1, "'answer' must be"),
        ("multiple_choice", ['{"question": "q", "choices": ["a"], "answer": 0}'], 1, "at least 2"),
        ("multiple_choice", ["[1, 2]"], 1, "expected a JSON object"),
        ("generate_until", ['{"question": "q", "answer": "a"}', '{"question": "q", "answer": 3}'], 2, "'answer' must be"),
        ("generate_until", ['{"answer": "a"}'], 1, "missing field 'question'"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, kind, lines, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        jsonl_task("bad", path, tmp_path / "tasks", kind=kind)
    assert isinstance(e.value, PaftError) and str(e.value).startswith(f"{path}:{line}: ")
    assert not (tmp_path / "tasks" / "bad.yaml").exists()


def test_jsonl_task_rejects_bad_names_and_empty_files(tmp_path):
    path = write_rows(tmp_path / "ok.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(ConfigError, match="task name"):
        jsonl_task("bad:name", path, tmp_path / "tasks")
    with pytest.raises(ConfigError, match="kind"):
        jsonl_task("ok", path, tmp_path / "tasks", kind="loglikelihood")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        jsonl_task("empty", tmp_path / "empty.jsonl", tmp_path / "tasks")
    with pytest.raises(DataError, match="no such file"):
        jsonl_task("gone", tmp_path / "gone.jsonl", tmp_path / "tasks")
