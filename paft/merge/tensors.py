"""safetensors folders, read lazily and written as a stream.

Reading: a file's header is parsed and checked (offsets, sizes, dtypes) and its data memory-mapped; a tensor
is a zero-copy view of the mapping (the page cache holds the bytes, so a model is never copied into the
process as a whole). Writing: the header is computed from the tensors' names, dtypes and shapes before any
data, then each tensor's bytes are appended as it is produced, so a shard never has to be held whole.
The format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
(plus ``__metadata__``), then the data (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from paft.errors import PaftError
from paft.io import read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One safetensors file: its checked header and zero-copy tensor views of its memory-mapped data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                if size < 8:
                    raise ValueError("shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
        except (OSError, ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            raise PaftError(f"{self.path}: corrupted safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise PaftError(f"{self.path}: corrupted safetensors file (bad header entry for {name!r})") from None
            if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
                raise PaftError(
                    f"{self.path}: corrupted safetensors file (tensor {name!r}: data {begin}..{end} does not "
                    f"match its shape {list(shape)} or the file's {data_size} data bytes; truncated?)"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        offset = self._start + begin
        if offset % dtype.itemsize:  # not aligned for a view: copy
            return torch.frombuffer(bytearray(self._map[offset: self._start + end]), dtype=dtype).view(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache; a later read maps them
        again): a merge that reads each tensor once keeps its resident memory to the tensors in work."""
        _, _, begin, end = self.entries[name]
        if not isinstance(self._map, mmap.mmap) or begin == end:
            return
        start = (self._start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, self._start + end - start)


class ModelWeights:
    """The tensors of a model folder (``model.safetensors``, or shards listed by ``model.safetensors.index.json``)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PaftError(f"{index}: no weight_map")
            fnames = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            fnames, weight_map = [SINGLE_FILE], None
        else:
            raise PaftError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (a safetensors model folder is needed)")
        self.files: dict[str, SafetensorsFile] = {}
        for fname in fnames:
            if not (self.dir / fname).is_file():
                raise PaftError(f"{self.dir}: weight file {fname} listed in the index is missing")
            self.files[fname] = SafetensorsFile(self.dir / fname)
        self.where = {name: fname for fname, f in self.files.items() for name in f.entries}
        for name, fname in (weight_map or {}).items():
            if self.where.get(name) != fname:
                raise PaftError(f"{self.dir / fname}: tensor {name!r} listed in the index is not in that file")

    def names(self) -> list[str]:
        return sorted(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.files[self.where[name]].entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].tensor(name)

    def release(self, name: str) -> None:
        if name in self.where:
            self.files[self.where[name]].release(name)

    def layout(self) -> dict[str, list[str]]:
        """``{file name: [tensor names in data order]}``: the layout an output in the same shards takes."""
        return {
            fname: sorted(f.entries, key=lambda n, f=f: f.entries[n][2]) for fname, f in self.files.items()
        }


class SafetensorsWriter:
    """A safetensors file written as a stream: the header first (from ``specs``: name, dtype, shape, in data
    order), then :meth:`write` appends each tensor in that order; closing checks that all came."""

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.specs, self.count = Path(path), specs, 0
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, t: torch.Tensor) -> None:
        name, dtype, shape = self.specs[self.count]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise PaftError(f"{self.path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        if t.numel():
            self._f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.count += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._f.close()
        if exc_type is None and self.count != len(self.specs):
            raise PaftError(f"{self.path}: {self.count} of {len(self.specs)} tensors written")
