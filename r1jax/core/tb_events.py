"""TensorBoard scalar event files, written directly: TFRecord framing around Event protos.

Why not tensorboardX: importing it imports torch when torch is installed (as it is wherever
transformers is), which adds seconds and hundreds of MB to every run's start for two dozen
bytes of protobuf per scalar. The format is small and stable:
  record = u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)
  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
tests/test_metrics.py reads the files back with tensorboardX's own parser and CRC.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Mapping

from r1jax.core import storage
from r1jax.core.storage import Path


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
  out = bytearray()
  while True:
    bits, n = n & 0x7F, n >> 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: Mapping[str, float], wall_time: float) -> bytes:
  summary = b"".join(
      _field(1, _field(1, tag.encode("utf-8")) + b"\x15" + struct.pack("<f", value))
      for tag, value in values.items())
  return (b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
          + _field(5, summary))


def version_event(wall_time: float) -> bytes:
  return b"\x09" + struct.pack("<d", wall_time) + _field(3, b"brain.Event:2")


def record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc(header)) + data
          + struct.pack("<I", masked_crc(data)))


class EventWriter:
  """Appends scalar summaries to a new events.out.tfevents.* file in `folder`."""

  def __init__(self, folder: str | Path):
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = folder / f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}"
    self._file: storage.Appender | None = storage.Appender(
        self.path, binary=True, upload_every_s=storage.LOG_UPLOAD_S)
    self._file.write(record(version_event(now)))

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._file.write(record(scalar_event(step, values, time.time())))
    self._file.flush()  # as the JSONL: a crash keeps every step written before it

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    self._file = None
