"""Turn a LoRA adapter into a standalone model folder (adapter folded into the base weights)."""

from __future__ import annotations

from pathlib import Path


def merged_model(base: str, adapter: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """(tokenizer, model) with the adapter at ``adapter`` folded into ``base``."""
    from peft import PeftModel

    from paft.models import load_model

    tokenizer, model = load_model(base, dtype, trust_remote_code)
    return tokenizer, PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def merge_adapter(base: str, folder: Path, dtype: str = "float32", trust_remote_code: bool = False) -> None:
    """Replace the adapter in ``folder`` by the full merged model (safetensors)."""
    tokenizer, model = merged_model(base, folder, dtype, trust_remote_code)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).unlink(missing_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
