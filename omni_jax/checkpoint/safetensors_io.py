"""Minimal safetensors reader/writer on numpy memory maps (bf16 via ml_dtypes), one tensor at a time.

The `safetensors` package's numpy backend cannot represent bfloat16; this reads the documented format directly
(8-byte little-endian header length, JSON header, raw little-endian data) so a tensor is only materialised when
asked for and nothing is read twice.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from omni_jax.errors import OmniJaxError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(OmniJaxError):
    pass


def read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_tensors(path: str, keys=None, *, copy: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) lazily; arrays are read-only views of a memory map (copy before mutating).

    copy=True reads each tensor into its own new array instead (no memory map stays resident: a streaming reader
    then holds one tensor at a time)."""
    header, offset = read_header(path)
    size = os.path.getsize(path)
    mm = None if copy else np.memmap(path, dtype=np.uint8, mode="r")
    f = open(path, "rb") if copy else None
    try:
        for name, info in header.items():
            if keys is not None and name not in keys:
                continue
            dt = DTYPES.get(info["dtype"])
            if dt is None:
                raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            if offset + end > size:
                raise SafetensorsError(f"{path}: tensor {name} extends past the end of the file (truncated shard?)")
            if copy:
                raw = np.empty(end - start, dtype=np.uint8)
                f.seek(offset + start)
                f.readinto(raw)
            else:
                raw = mm[offset + start:offset + end]
            yield name, raw.view(dt).reshape(info["shape"])
    finally:
        if f is not None:
            f.close()


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    header, pos = {}, 0
    names = list(tensors)
    for name in names:
        a = np.asarray(tensors[name])
        if a.dtype not in NAMES:
            raise SafetensorsError(f"cannot write dtype {a.dtype} for {name}")
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, path)
