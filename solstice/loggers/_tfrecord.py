"""TFRecord files (TensorBoard's event files): framing, reading back, appending."""

import os
import struct
from typing import BinaryIO


def _masked_crc(data: bytes) -> int:
    from tensorboardX.record_writer import masked_crc32c

    return masked_crc32c(data)


def frame(data: bytes) -> bytes:
    """`data` as one record: length, its CRC, the data, its CRC (masked CRC-32C, little
    endian), as TensorFlow writes them."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def read_records(path: str) -> tuple[list[bytes], bool]:
    """The records of the file `path`, up to the first one that is cut short or fails its
    checksums (a crash mid-write); and whether the whole file was read."""
    with open(path, "rb") as f:
        data = f.read()
    records, pos, size = [], 0, len(data)
    while pos + 12 <= size:
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack_from("<I", data, pos + 8)
        end = pos + 12 + length + 4
        if header_crc != _masked_crc(header) or end > size:
            break
        payload = data[pos + 12 : end - 4]
        (payload_crc,) = struct.unpack_from("<I", data, end - 4)
        if payload_crc != _masked_crc(payload):
            break
        records.append(payload)
        pos = end
    return records, pos == size


class RecordFile:
    """Appends records to a file (created, or opened to append with `append=True`)."""

    def __init__(self, path: str, *, append: bool = False):
        self.path = path
        self._file: BinaryIO = open(path, "ab" if append else "wb")

    def write(self, data: bytes) -> None:
        self._file.write(frame(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
