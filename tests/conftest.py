from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The smallest run that still exercises every stage (seconds per stage on 2 CPU cores).
MICRO = {
    "data": {"sources": [{"kind": "synthetic", "n_sft": 64, "n_preference": 32, "n_rec": 64, "n_eval": 8}]},
    "model": {"tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                       "num_heads": 2, "pretrain_steps": 20, "pretrain_batch_size": 4, "pretrain_max_length": 128}},
    "train": {
        "sft": {"max_steps": 6, "batch_size": 4, "warmup_steps": 0, "logging_steps": 2, "lora": {"r": 4, "alpha": 8}},
        "align": {"max_steps": 6, "batch_size": 4, "warmup_steps": 0, "logging_steps": 2, "lora": {"r": 4, "alpha": 8}},
    },
    "rec": {"max_steps": 4, "batch_size": 4, "max_length": 512, "warmup_steps": 0, "logging_steps": 2, "max_new_tokens": 32,
            "lora": {"r": 4, "alpha": 8}},
    "evaluate": {"max_examples": 8, "max_new_tokens": 8, "batch_size": 8},
    "resources": {"cpu_threads": 1},
}


def write_params(folder: Path, extra: dict | None = None) -> Path:
    """A complete params file in ``folder`` (relative paths resolve there): MICRO plus ``extra``."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(merge(MICRO, extra or {})))
    return path


@pytest.fixture
def micro_params(tmp_path) -> Path:
    return write_params(tmp_path)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (../shared/data beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every in-process flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
