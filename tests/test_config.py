import subprocess
import sys

import pytest

from paft.config import load_params, parse_overrides
from paft.errors import ConfigError
from tests.conftest import ROOT


def test_default_params_file_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.model.base == "tiny"
    assert p.merge.methods[0] == "ties"
    assert p.tracking_uri.startswith("sqlite:////")  # resolved against the params file's folder


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  sft:\n    lr: -1\n", "train.sft.lr"),
        ("train:\n  sft:\n    lrr: 0.1\n", "train.sft.lrr"),
        ("merge:\n  methods: [nonsense]\n", "merge.methods[0]"),
        ("data:\n  sources:\n    - {kind: local, path: x.jsonl, format: sft_jsonl, bogus: 1}\n", "data.sources[0].bogus"),
        ("model:\n  tiny:\n    hidden_size: 30\n    num_heads: 4\n", "model.tiny"),
    ],
)
def test_bad_value_names_the_dotted_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}:"), msg
    assert "\n" not in msg


def test_overrides_are_yaml_and_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    p = load_params(path, ["train.sft.max_steps=7", "merge.methods=[task_arithmetic]", "merge.lambda=0.5"])
    assert p.train.sft.max_steps == 7 and p.merge.methods == ["task_arithmetic"] and p.merge.lambda_ == 0.5
    with pytest.raises(ConfigError, match="train.sft.max_steps"):
        load_params(path, ["train.sft.max_steps=zero"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  sft: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_params(path)


def test_cli_bad_params_one_line_nonzero_exit_no_outputs(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  batch_size: 0\n")
    proc = subprocess.run([sys.executable, "-m", "paft.cli", "run", "--params", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "evaluate.batch_size" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_unreachable_tracking_server_stops_the_run_before_any_work(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    path = tmp_path / "params.yaml"
    path.write_text(f"tracking:\n  uri: http://127.0.0.1:{port}\n")
    proc = subprocess.run([sys.executable, "-m", "paft.cli", "run", "--params", str(path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"http://127.0.0.1:{port}" in lines[0] and "unreachable" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_training_variants_are_copies_of_their_section_with_changes(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  sft: {lr: 0.01}\n  variants:\n    sft_l1: {from: sft, l1: {weight: 0.2}}\n"
                    "    orpo: {from: align, method: orpo}\nmerge:\n  sft: [sft, sft_l1]\n  align: [orpo]\n")
    p = load_params(path)
    assert p.train.jobs() == {"sft": "sft", "align": "align", "sft_l1": "sft", "orpo": "align"}
    kind, cfg = p.train.job("sft_l1")
    assert kind == "sft" and cfg.l1.weight == 0.2 and cfg.lr == 0.01 and p.train.sft.l1.weight == 0
    assert p.train.job("orpo")[1].method == "orpo" and p.train.job("orpo")[1].beta == p.train.align.beta
    with pytest.raises(ConfigError, match="no training job 'dpo'"):
        p.train.job("dpo")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.variants.sft_l1={from: sft, l1: {weight: -1}}", "train.variants.sft_l1.l1.weight"),
        ("train.variants.sft_l1={from: sft, bogus: 1}", "train.variants.sft_l1.bogus"),
        ("train.variants.x={from: nothing}", "train.variants.x.from"),
        ("train.variants.sequential={from: sft}", "train.variants"),
        ("train.variants.Bad-Name={from: sft}", "train.variants"),
        ("merge.sft=[align]", "merge.sft"),
        ("merge.align=[orpo]", "merge.align"),
        ("merge.search.sft=missing", "merge.search.sft"),
        ("merge.search.weights=[[1.0]]", "merge.search.weights[0]"),
        ("merge.search.densities=[0]", "merge.search.densities[0]"),
    ],
)
def test_bad_variant_or_job_reference_names_the_key(tmp_path, override, key):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError) as e:
        load_params(path, [override])
    assert str(e.value).startswith(f"{path}: {key}:"), str(e.value)
