"""The model card (README.md) of a merged model folder: what was merged, how, and the inputs' file hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from paft.io import write_json

HASHED_JSON = ("adapter_config.json", "config.json")


def hash_cache_file() -> Path:
    """Where file digests are remembered: ``$PAFT_HASH_CACHE``, else ``~/.cache/paft/sha256.json``."""
    return Path(os.environ.get("PAFT_HASH_CACHE") or Path.home() / ".cache" / "paft" / "sha256.json")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cached_digests(files: list[Path]) -> list[str]:
    """sha256 of each file; a file whose path, size, mtime and inode match a remembered one is not read
    again (a merge search merges the same inputs many times). The cache is best effort: unreadable, it is
    rebuilt; unwritable, it is skipped."""
    cache_file = hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = [f"{f.resolve()}|{_stamp(f)}" for f in files]
    todo = [(f, k) for f, k in zip(files, keys, strict=True) if k not in cache]
    cache.update(zip((k for _, k in todo), _digests([f for f, _ in todo])))
    if todo:
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_file, cache)
    return [cache[k] for k in keys]


def _hashed_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    files = [*folder.glob("*.safetensors"), *(folder / n for n in HASHED_JSON)]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.name)


def _digests(files: list[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers: two files hash at once (more threads only contend for the disk)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(_sha256, files))


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of each ``*.safetensors`` file and of ``adapter_config.json`` / ``config.json`` of ``folder``,
    by file name (sorted)."""
    files = _hashed_files(folder)
    return dict(zip((f.name for f in files), _cached_digests(files)))


def input_hashes(base: str | Path, input_paths: list[str | Path]) -> dict[str, dict[str, str]]:
    """:func:`file_hashes` of the base and of every input folder, keyed by the path as given."""
    folders = [str(p) for p in (base, *input_paths)]
    files = {f: _hashed_files(f) for f in dict.fromkeys(folders)}
    flat = [p for ps in files.values() for p in ps]
    digests = iter(_cached_digests(flat))
    return {f: {p.name: next(digests) for p in ps} for f, ps in files.items()}


def _share(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def model_card(summary: dict, recipe_yaml: str, hashes: dict[str, dict[str, str]]) -> str:
    """README.md for a merged model folder: front matter, what was merged, the inputs, the recipe (re-runnable
    with ``paft merge --recipe``) and the sha256 of the base's and the inputs' weight files."""
    method, base = summary["method"], str(summary["base"])
    front = yaml.safe_dump({"base_model": base, "library_name": "transformers", "tags": ["merge", "paft", method]},
                           sort_keys=False, default_flow_style=None)
    inputs = summary["inputs"]
    rows = "\n".join(f"| `{i['path']}` | {i['kind']} | {i['weight']:g} | {i['density']:g} | {_share(i.get('sparsity'))} |"
                     for i in inputs)
    mergekit = f" (mergekit: `{summary['mergekit']}`)" if summary.get("mergekit") else ""
    lines = [
        f"---\n{front}---",
        f"# {Path(base).name or base} merged with {method}",
        f"This model is `{base}` with {len(inputs)} fine-tuned model{'s' if len(inputs) != 1 else ''} merged into it "
        f"by paft with the **{method}** method{mergekit} "
        f"([paper]({summary['reference']})): each input's delta from the base (a LoRA adapter's `B·A·scale`, or a full "
        "model's difference) is weighted and combined, then added to the base.",
        "## Inputs",
        "| path | kind | weight | density | sparsity after trimming |\n|---|---|---|---|---|\n" + rows,
        "## Recipe",
        "Re-run with `paft merge --recipe recipe.yml --out DIR`:",
        f"```yaml\n{recipe_yaml.rstrip()}\n```",
        "## Input hashes",
        "sha256 of each weight and config file of the base and of the inputs, as read for this merge.",
    ]
    for folder, files in hashes.items():
        table = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in files.items())
        role = "base" if folder == base else "input"
        lines.append(f"### `{folder}` ({role})\n\n| file | sha256 |\n|---|---|\n{table}")
    return "\n\n".join(lines) + "\n"
