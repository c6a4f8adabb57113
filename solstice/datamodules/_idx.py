"""The IDX file format of MNIST and Fashion-MNIST: read (gzipped or raw) and write.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the data in C order, big-endian.
"""

import gzip
import math
import os
import struct
import zlib

import numpy as np

# dtype code -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    if path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(
                f"Cannot decompress {path!r}: {e}. The file is truncated or corrupt; delete it "
                "and download it again."
            ) from e
    with open(path, "rb") as f:
        return f.read()


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file into a native-endian numpy array (a writable copy).

    Raises `ValueError`, naming `name`, for a bad magic number, an unknown dtype code, or a
    size that disagrees with the header (truncated file or trailing bytes).
    """
    if len(data) < 4:
        raise ValueError(
            f"{name!r} has {len(data)} bytes, fewer than the 4-byte IDX magic number; the "
            "file is truncated or not an IDX file."
        )
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or code not in IDX_DTYPES:
        raise ValueError(
            f"{name!r} does not start with an IDX magic number (got bytes "
            f"{data[:4].hex()}; expected 0000 then a dtype code in "
            f"{sorted(hex(c) for c in IDX_DTYPES)} and the number of dimensions). Is it an "
            "MNIST-format file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{name!r} is truncated: its header declares {ndim} dimensions ({header} header "
            f"bytes) but the file has only {len(data)} bytes."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{name!r} {problem}: its header declares shape {shape} of {dtype.name} "
            f"({expected} bytes in all) but the file has {len(data)} bytes. Delete it and "
            "download it again."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # Always a copy: a writable array that owns numpy-allocated memory (large ones get
    # transparent huge pages where the kernel offers them, which makes the random row
    # gathers of shuffled batches faster) rather than a read-only view of `data`.
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (`.gz` files are decompressed). See `parse_idx` for the errors."""
    return parse_idx(_read_bytes(path), os.fspath(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` as an IDX file (gzipped if `path` ends in `.gz`)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(
            f"IDX cannot store dtype {array.dtype}; use one of "
            f"{sorted({str(d.newbyteorder('=')) for d in IDX_DTYPES.values()})}."
        )
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(native.newbyteorder(">")).tobytes()
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
