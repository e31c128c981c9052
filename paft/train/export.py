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
    _save(tokenizer, model, folder)


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def model_folder(base: str, trained: str | Path, out: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> str:
    """A standalone model folder for a training output: itself if it is a full model, else base + adapter
    folded into ``out`` (written whole)."""
    from paft.io import atomic_dir

    if not is_adapter(trained):
        return str(trained)
    tokenizer, model = merged_model(base, trained, dtype, trust_remote_code)
    with atomic_dir(out) as tmp:
        _save(tokenizer, model, tmp)
    return str(out)


def _save(tokenizer, model, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
