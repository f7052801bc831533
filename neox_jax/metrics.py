"""Where training metrics go: the console, TensorBoard event files and (when asked and installed) wandb.

TensorBoard files are written directly (TFRecord framing, a hand-encoded `Event` protobuf with scalar
summaries), so logging needs neither TensorFlow nor tensorboardX.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

# ---- TensorBoard ------------------------------------------------------------------------------------------

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _event(wall_time: float, step: int | None = None, tag: str | None = None, value: float | None = None,
           file_version: str | None = None) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 {value=1 {tag=1, simple_value=2}}}."""
    msg = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        msg += _field(2, 0, _varint(step))
    if file_version is not None:
        data = file_version.encode()
        msg += _field(3, 2, _varint(len(data)) + data)
    if tag is not None:
        t = tag.encode()
        val = _field(1, 2, _varint(len(t)) + t) + _field(2, 5, struct.pack("<f", value))
        summary = _field(1, 2, _varint(len(val)) + val)
        msg += _field(5, 2, _varint(len(summary)) + summary)
    return msg


class TensorBoardWriter:
    def __init__(self, logdir: str | os.PathLike):
        self.dir = Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.dir / name
        self._f = open(self.path, "ab")
        self._write(_event(time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes):
        header = struct.pack("<Q", len(record))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + record
                      + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict[str, float]):
        now = time.time()
        for tag, value in values.items():
            self._write(_event(now, step, tag, float(value)))
        self._f.flush()

    def close(self):
        self._f.close()


def read_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """(step, tag, value) from an event file we wrote: the reader the tests use to check what was logged."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        record = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked_crc(record):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 16 + n
        fields = _parse(record)
        if 5 in fields:
            value = _parse(_parse(fields[5])[1])
            out.append((fields.get(2, 0), value[1].decode(), struct.unpack("<f", value[2])[0]))
    return out


def _parse(msg: bytes) -> dict:
    fields, pos = {}, 0
    while pos < len(msg):
        key, pos = _read_varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _read_varint(msg, pos)
        elif wire == 1:
            fields[number], pos = msg[pos:pos + 8], pos + 8
        elif wire == 5:
            fields[number], pos = msg[pos:pos + 4], pos + 4
        else:
            n, pos = _read_varint(msg, pos)
            fields[number], pos = msg[pos:pos + n], pos + n
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


# ---- all sinks ------------------------------------------------------------------------------------------------


class MetricsLogger:
    """Fan out scalar metrics to TensorBoard and wandb; the console line is the training loop's."""

    def __init__(self, tensorboard_dir: str = "", wandb_project: str = "", config: dict | None = None):
        self.tb = TensorBoardWriter(tensorboard_dir) if tensorboard_dir else None
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb): logging without it")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step: int, values: dict[str, float]):
        if self.tb:
            self.tb.scalars(step, values)
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
