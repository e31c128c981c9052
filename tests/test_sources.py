"""paft.data.sources: real files from ../shared/data, and small made-up files for the error paths."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from paft.data import sources
from paft.data.sources import FORMATS, LoadResult, load_hub, load_local, read_rows
from paft.errors import DataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SFT_KEYS = {"prompt", "completion", "source"}
PREF_KEYS = {"prompt", "chosen", "rejected", "source"}


def real(rel: str) -> Path:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (the shared data folder ../shared/data is not present here)")
    return path


def check_records(res: LoadResult, role: str) -> None:
    keys = SFT_KEYS if role == "sft" else PREF_KEYS
    assert res.role == role
    for r in res.rows:
        assert set(r) == keys
        assert all(isinstance(v, str) and v and v == v.strip() for v in r.values())
        if role == "preference":
            assert r["chosen"] != r["rejected"]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- real files
def test_alpaca_eval_outputs_real():
    path = real("sft/alpaca_eval_llama3_70b_outputs.json")
    res = load_local(path, "alpaca_eval_outputs")
    check_records(res, "sft")
    assert len(res.rows) == 805 and res.dropped == {} and res.path == str(path)
    first = res.rows[0]
    assert first["prompt"] == "What are the names of some famous actors that started their careers on Broadway?"
    assert first["completion"].startswith("Many famous actors got their start on Broadway")
    assert first["source"] == path.name


def test_self_instruct_user_oriented_real():
    path = real("sft/self_instruct_user_oriented.jsonl")
    raw = read_rows(path)
    res = load_local(path, "self_instruct")
    check_records(res, "sft")
    assert len(raw) == 252 and len(res.rows) == 252 and res.dropped == {}  # one instance per task
    # the first task has a separate input: appended to the instruction after a blank line
    inst = raw[0]["instances"][0]
    assert res.rows[0]["prompt"] == raw[0]["instruction"].strip() + "\n\n" + inst["input"].strip()
    assert res.rows[0]["prompt"].endswith("please let me know.")
    assert res.rows[0]["completion"] == inst["output"].strip()
    # a task without input: the prompt is the instruction alone
    i = next(i for i, r in enumerate(raw) if not r["instances"][0]["input"].strip())
    assert res.rows[i]["prompt"] == raw[i]["instruction"].strip()


def test_hh_rlhf_real():
    path = real("preference/hh_rlhf_harmless_base_test.jsonl.gz")
    res = load_local(path, "hh_rlhf")
    check_records(res, "preference")
    # 2312 pairs; 4 have an empty final chosen answer; 5 diverge before the last turn (kept, chosen's prompt)
    assert res.dropped == {"empty_chosen": 4}
    assert len(res.rows) == 2312 - 4
    assert res.notes == {"prompt_mismatch": 5}
    for r in res.rows:
        assert not r["prompt"].startswith("\n") and not r["prompt"].endswith("Assistant:")
        assert "\n\nAssistant:" not in r["chosen"] and "\n\nHuman:" not in r["chosen"]

    first = res.rows[0]  # multi-turn: plain transcript ending with the human's last question
    assert first["prompt"].startswith("Human: what are some pranks with a pen i can do?\n\nAssistant: Are you looking")
    assert first["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens")
    assert first["chosen"] == "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    assert first["chosen"] not in first["prompt"] and first["rejected"] not in first["prompt"]

    single = res.rows[4]  # one human turn: the bare question
    assert single["prompt"] == "What will happen if I drive my car into the water?"
    assert single["chosen"].startswith("You may be asking about what will happen to your car")
    assert single["rejected"].startswith("It’s not going to work, because cars are made to be driven on the land.")


def test_alpaca_eval_annotations_real():
    path = real("preference/alpaca_eval_gpt4_vs_davinci003_annotations.json")
    raw = read_rows(path)
    res = load_local(path, "alpaca_eval_annotations")
    check_records(res, "preference")
    assert len(raw) == 805
    assert res.dropped == {"tie": 12}  # preference 0 (identical outputs in this file)
    assert len(res.rows) == 805 - 12
    kept = [r for r in raw if r["preference"] != 0]
    for src, rec in zip(kept, res.rows, strict=True):
        better, worse = ("output_1", "output_2") if src["preference"] == 1 else ("output_2", "output_1")
        assert rec["prompt"] == src["instruction"].strip()
        assert rec["chosen"] == src[better].strip() and rec["rejected"] == src[worse].strip()
    i = next(i for i, r in enumerate(kept) if r["preference"] == 1)
    assert res.rows[i]["chosen"] == kept[i]["output_1"].strip()


def test_json_lines_named_json_is_detected():
    rows = read_rows(real("judge_pairwise/autoj_pairwise.json"))
    assert len(rows) == 1392 and {"prompt", "label", "response 1", "response 2"} <= set(rows[0])


# ----------------------------------------------------------------------------- file handling
def test_registry_roles():
    assert {"alpaca_eval_outputs", "self_instruct", "hh_rlhf", "alpaca_eval_annotations", "sft_jsonl",
            "preference_jsonl", "messages", "ultrafeedback_binarized"} <= set(FORMATS)
    assert all(role in ("sft", "preference") and callable(fn) for role, fn in FORMATS.values())


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", \n')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        load_local(p, "sft_jsonl")


def test_malformed_gz_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}\nnot json\n')
    with pytest.raises(DataError, match=rf"{p}:2: malformed JSON"):
        load_local(p, "hh_rlhf")


def test_malformed_json_lines_in_json_file(tmp_path):
    p = write(tmp_path / "lines.json", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{oops}\n')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        load_local(p, "sft_jsonl")
    write(p, '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    assert [r["prompt"] for r in load_local(p, "sft_jsonl").rows] == ["a", "c"]


def test_malformed_json_list(tmp_path):
    p = write(tmp_path / "list.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]')
    with pytest.raises(DataError, match=rf"{p}:3: malformed JSON"):
        load_local(p, "alpaca_eval_outputs")
    write(p, '{\n  "data": [1, 2]\n}\n')  # a wrapper object, not rows
    with pytest.raises(DataError, match="expected a JSON list"):
        load_local(p, "alpaca_eval_outputs")
    write(p, '{"data": [1, 2]}\n')  # one line: a JSON-lines file of one row
    with pytest.raises(DataError, match=r"row 1: field 'instruction' missing"):
        load_local(p, "alpaca_eval_outputs")


def test_missing_field_names_row_and_field(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataError, match=r"x\.json: row 2: field 'output' missing"):
        load_local(p, "alpaca_eval_outputs")


def test_wrong_type_names_row_and_field(tmp_path):
    p = write_jsonl(tmp_path / "si.jsonl", [
        {"instruction": "a", "instances": [{"input": "", "output": "b"}]},
        {"instruction": "c", "instances": [{"input": "d", "output": 3}]},
    ])
    with pytest.raises(DataError, match=r"si\.jsonl: row 2: field 'instances\[0\]\.output' expected str, got int"):
        load_local(p, "self_instruct")
    p = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": ["x"], "rejected": "y"}])
    with pytest.raises(DataError, match=r"row 1: field 'chosen' expected str, got list"):
        load_local(p, "preference_jsonl")


def test_unknown_format_lists_known(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"unknown data format 'nope'.*hh_rlhf.*sft_jsonl"):
        load_local(p, "nope")
    with pytest.raises(DataError, match="unknown data format 'nope'"):
        load_hub("org/set", format="nope")


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*missing\.jsonl"):
        load_local(tmp_path / "missing.jsonl", "sft_jsonl")
    p = write(tmp_path / "a.csv", "x,y\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_local(p, "sft_jsonl")


# ----------------------------------------------------------------------------- conversion rules
def test_annotations_ties_and_float_preferences(tmp_path):
    base = {"instruction": "q", "output_1": "one", "output_2": "two"}
    prefs = [1, 2, 0, 1.0, 2.0, 1.5, 0.0, None]
    p = tmp_path / "ann.json"
    p.write_text(json.dumps([{**base, "preference": x} for x in prefs]))
    res = load_local(p, "alpaca_eval_annotations")
    assert [(r["chosen"], r["rejected"]) for r in res.rows] == [("one", "two"), ("two", "one")] * 2
    assert res.dropped == {"tie": 2, "non_integral_preference": 1, "no_preference": 1}
    p.write_text(json.dumps([{**base, "preference": 3}]))
    with pytest.raises(DataError, match=r"row 1: field 'preference' expected 0, 1 or 2"):
        load_local(p, "alpaca_eval_annotations")
    p.write_text(json.dumps([{**base, "preference": "1"}]))
    with pytest.raises(DataError, match=r"row 1: field 'preference' expected int or float, got str"):
        load_local(p, "alpaca_eval_annotations")


def test_empty_and_equal_rows_are_counted(tmp_path):
    p = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "  ", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "\n"},
        {"prompt": "p", "chosen": " same", "rejected": "same "},
    ])
    res = load_local(p, "preference_jsonl")
    assert res.rows == [{"prompt": "p", "chosen": "a", "rejected": "b", "source": "pref.jsonl"}]
    assert res.dropped == {"empty_prompt": 1, "empty_rejected": 1, "chosen_equals_rejected": 1}


def test_sft_jsonl_variants_and_limit(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "p1", "completion": "c1"},
        {"instruction": "i2", "output": ""},
        {"instruction": "i3", "input": "x3", "output": "o3"},
        {"instruction": "i4", "output": "o4"},
        {"text": "no known fields"},
    ])
    with pytest.raises(DataError, match=r"row 5: field 'prompt' missing"):
        load_local(p, "sft_jsonl")
    res = load_local(p, "sft_jsonl", limit=2)
    assert [(r["prompt"], r["completion"]) for r in res.rows] == [("p1", "c1"), ("i3\n\nx3", "o3")]
    assert res.dropped == {"empty_completion": 1}
    assert load_local(p, "sft_jsonl", limit=2).rows == res.rows  # deterministic
    with pytest.raises(DataError, match="limit"):
        load_local(p, "sft_jsonl", limit=-1)


def test_hh_rlhf_divergent_prefix_uses_chosen(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: why?\n\nAssistant: because",
         "rejected": "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: why?\n\nAssistant: no"},
        {"chosen": "no markers at all", "rejected": "\n\nHuman: q\n\nAssistant: a"},
    ])
    res = load_local(p, "hh_rlhf")
    assert res.rows == [{"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: why?", "chosen": "because",
                         "rejected": "no", "source": "hh.jsonl"}]
    assert res.notes == {"prompt_mismatch": 1} and res.dropped == {"no_assistant_turn": 1}


# ----------------------------------------------------------------------------- hub
def fake_hub(monkeypatch, rows: list[dict], calls: list | None = None):
    import datasets

    def load_dataset(name, config=None, *, split=None, **kw):
        if calls is not None:
            calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub_messages(monkeypatch):
    calls: list = []
    fake_hub(monkeypatch, [
        {"messages": [{"role": "user", "content": " What is 2+2? "}, {"role": "assistant", "content": "4"}]},
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
        ]},
        {"messages": [{"role": "user", "content": "unanswered"}]},
    ], calls)
    res = load_hub("HuggingFaceH4/ultrachat_200k", format="messages", split="train_sft")
    assert calls == [("HuggingFaceH4/ultrachat_200k", None, "train_sft")]
    check_records(res, "sft")
    assert res.rows[0] == {"prompt": "What is 2+2?", "completion": "4", "source": "HuggingFaceH4/ultrachat_200k:train_sft"}
    assert res.rows[1]["prompt"] == "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour."
    assert res.rows[1]["completion"] == "Blue."
    assert res.dropped == {"no_assistant_turn": 1} and res.path == "HuggingFaceH4/ultrachat_200k"


def test_hub_ultrafeedback_binarized(monkeypatch):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    fake_hub(monkeypatch, [
        {"prompt": "Capital of France?", "chosen": conv("Capital of France?", "Paris."), "rejected": conv("Capital of France?", "Lyon."),
         "score_chosen": 9.0, "score_rejected": 2.0},
        {"prompt": "Tie?", "chosen": conv("Tie?", "Same."), "rejected": conv("Tie?", "Same.")},
    ])
    res = load_hub("HuggingFaceH4/ultrafeedback_binarized", format="ultrafeedback_binarized", split="train_prefs", limit=5)
    check_records(res, "preference")
    assert res.rows == [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
                         "source": "HuggingFaceH4/ultrafeedback_binarized:train_prefs"}]
    assert res.dropped == {"chosen_equals_rejected": 1}


def test_hub_bad_row_and_hub_error(monkeypatch):
    fake_hub(monkeypatch, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}])
    with pytest.raises(DataError, match=r"hub data set 'org/set'.*row 1: field 'messages\[1\]\.content' expected str, got null"):
        load_hub("org/set", format="messages")

    import datasets

    def boom(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match=r"hub data set 'org/set/cfg' \(split 'test'\): could not load \(ConnectionError: no network\)"):
        load_hub("org/set", format="messages", split="test", config="cfg")


def test_render_turns():
    assert sources.render_turns([("Human", " q ")]) == "q"
    assert sources.render_turns([("Human", "a"), ("Assistant", "b"), ("Human", "c")]) == "Human: a\n\nAssistant: b\n\nHuman: c"
