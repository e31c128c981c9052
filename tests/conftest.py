from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# merged models' input hashes are remembered in a file: not the user's during tests
os.environ.setdefault("PAFT_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="paft-hashes-"), "sha256.json"))

# The smallest run that still exercises every stage (seconds per stage on 2 CPU cores).
MICRO = {
    "data": {"sources": [{"kind": "synthetic", "n_sft": 64, "n_preference": 32, "n_rec": 64, "n_eval": 8}]},
    "model": {"tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                       "num_heads": 2, "pretrain_steps": 20, "pretrain_batch_size": 4, "pretrain_max_length": 128}},
    "train": {
        "sft": {"max_steps": 6, "batch_size": 4, "warmup_steps": 0, "logging_steps": 2, "lora": {"r": 4, "alpha": 8}},
        "align": {"max_steps": 6, "batch_size": 4, "warmup_steps": 0, "logging_steps": 2, "lora": {"r": 4, "alpha": 8}},
    },
    "rec": {"max_steps": 4, "batch_size": 4, "max_length": 768, "warmup_steps": 0, "logging_steps": 2, "max_new_tokens": 32,
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


def save_lora_adapter(model, path, seed: int = 0, random_b: bool = True, **lora_kwargs):
    """Wrap ``model`` in a LoRA (r 4, all-linear unless overridden), give B (and any trained full module)
    random nonzero values when ``random_b`` (peft starts B at zero), save the adapter in ``path``; returns
    the peft model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | lora_kwargs))
    if random_b:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "lora_embedding" in name or "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_lm():
    """(tokenizer, randomly initialised tiny Llama) with a tokenizer trained on the synthetic world's text."""
    import json

    from paft.config import TinyModelConfig
    from paft.data import world
    from paft.models import build_tiny, train_tokenizer

    parts = world.generate(0, 40, 20, 40, 8, ["faithfulness", "coherence"])
    tok = train_tokenizer([json.dumps(r) for rows in parts.values() for r in rows], 400)
    cfg = TinyModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    return tok, build_tiny(cfg, tok)
