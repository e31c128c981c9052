"""Small I/O helpers shared by every stage: JSONL, atomic folders, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from paft.errors import DataError


def iter_jsonl(lines: Iterable[str], path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) per non-blank line; a malformed line raises DataError naming ``file:line``."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {'null' if row is None else type(row).__name__}")
        yield lineno, row


def parse_jsonl(lines: Iterable[str], path: str | Path) -> list[dict]:
    """JSON objects, one per line (blank lines skipped); a malformed line raises DataError naming ``file:line``."""
    return [row for _, row in iter_jsonl(lines, path)]


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a malformed line raises DataError naming ``file:line``."""
    with Path(path).open(encoding="utf-8") as f:
        return parse_jsonl(f, path)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj) -> None:
    """Written whole or not at all: a reader (another process polling for it) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(dest: str | Path, keep: str = "never") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``dest`` whole, on error it is removed.

    Readers never see a half-written ``dest``: the old one (if any) stays until the new one is complete.
    ``keep``: "same" leaves ``dest`` untouched when it already holds the same content, "any" whenever it exists
    (a content-addressed cache); the new copy is dropped. So runs sharing ``dest`` (two flows preparing the same
    data, building the same cached model) never swap a folder another one is reading.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    def kept() -> bool:
        return dest.is_dir() and (keep == "any" or (keep == "same" and hash_dir(dest) == hash_dir(tmp)))

    if kept():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:  # another writer put a folder there in the meantime
        if not kept():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def hash_dir(path: str | Path) -> str:
    """Content hash of a folder (relative paths and bytes, in sorted order): the data version."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def hash_obj(obj) -> str:
    """Stable short hash of a JSON-serialisable object (config sections)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
