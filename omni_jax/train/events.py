"""A minimal TensorBoard event-file writer (scalars only), so training needs neither TensorFlow nor tensorboard.

File format: TFRecord framing (uint64 length, masked CRC32C of the length, payload, masked CRC32C of the
payload) around `Event` protocol buffers, hand-encoded: Event{wall_time=1 (double), step=2 (int64),
file_version=3 (string), summary=5 (Summary{value=1 (Value{tag=1 (string), simple_value=2 (float)})})}.
"""

from __future__ import annotations

import socket
import struct
import time


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
    return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    ev = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        ev += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
                           for tag, v in scalars.items())
        ev += _bytes_field(5, summary)
    return ev


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return (length + struct.pack("<I", _masked(crc32c(length))) + record
            + struct.pack("<I", _masked(crc32c(record))))


class EventWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (logdir may be a URL:
    omni_jax.paths)."""

    def __init__(self, logdir: str):
        from omni_jax import paths

        paths.makedirs(logdir)
        self.path = paths.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self.f = paths.AppendFile(self.path)
        self.f.write(frame(encode_event(0, time.time(), file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]):
        self.f.write(frame(encode_event(step, time.time(), {k: float(v) for k, v in values.items()})))
        self.f.flush()

    def close(self):
        self.f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """Decode a file written by EventWriter (for tests): [(step, {tag: value})], checking every CRC."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        (lc,) = struct.unpack_from("<I", data, i + 8)
        if lc != _masked(crc32c(data[i:i + 8])):
            raise ValueError("bad length CRC")
        rec = data[i + 12:i + 12 + n]
        (dc,) = struct.unpack_from("<I", data, i + 12 + n)
        if dc != _masked(crc32c(rec)):
            raise ValueError("bad data CRC")
        out.append(_decode_event(rec))
        i += 16 + n
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        yield num, v


def _decode_event(rec: bytes) -> tuple[int, dict[str, float]]:
    step, scalars = 0, {}
    for num, v in _fields(rec):
        if num == 2:
            step = v
        elif num == 5:
            for _, value in _fields(v):
                d = dict(_fields(value))
                scalars[d[1].decode()] = struct.unpack("<f", d[2])[0]
    return step, scalars
