"""Reading CIFAR-10 batch files: the binary distribution, and torchvision's pickles safely.

Binary (`cifar-10-batches-bin/*.bin`): records of 1 label byte then 3,072 pixel bytes
(1,024 red, 1,024 green, 1,024 blue, each 32x32 row-major), so channel-first already.

Python (`cifar-10-batches-py/*`): a pickled dict with `data` (a `uint8` array `(N, 3072)`,
same pixel layout) and `labels` (a list of ints). Pickles can run arbitrary code when loaded,
so they are read with `SafeUnpickler`, which builds only plain containers, strings, bytes,
numbers and numpy arrays, and refuses every other global.
"""

import io
import os
import pickle

import numpy as np

RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar_binary(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch: `(images uint8 (N, 3, 32, 32), labels int32 (N,))`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) == 0 or len(data) % RECORD_BYTES != 0:
        whole = len(data) // RECORD_BYTES
        raise ValueError(
            f"{path!r} has {len(data)} bytes, which is not a whole number of "
            f"{RECORD_BYTES}-byte CIFAR-10 records (1 label byte + 3072 pixel bytes); "
            f"expected {max(whole, 1) * RECORD_BYTES} bytes for {max(whole, 1)} records (a full "
            f"batch has {10000 * RECORD_BYTES}). The file is truncated or corrupt; delete the "
            "folder and download it again."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    # A contiguous copy, not a strided view of `records`: loaders gather rows of it per batch.
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)
    return images, labels


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # Old pickles name `numpy.core`, numpy 2 pickles `numpy._core`; both mean the same.
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # What Python 3 pickles of `bytes` call (`_codecs.encode`), restricted to latin-1.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing `_codecs.encode` with encoding {encoding!r}")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and numpy arrays.

    `find_class` allows the numpy array and dtype reconstructors (and a latin-1
    `_codecs.encode`) and raises `pickle.UnpicklingError` for every other global, such as
    `os.system` or `builtins.eval`, before anything is called.

    **Example:**

    ```python
    with open("cifar-10-batches-py/data_batch_1", "rb") as f:
        batch = SafeUnpickler(f, encoding="latin1").load()
    ```
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str) -> object:
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = {**_numpy_globals(), ("_codecs", "encode"): _encode}
        try:
            return SafeUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load the global `{module}.{name}`: only plain containers, "
                "bytes and numpy arrays are allowed"
            ) from None


def safe_load_pickle(data: bytes, name: str) -> object:
    """Unpickle `data` with `SafeUnpickler`; `ValueError` naming `name` if it is refused."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"Could not safely read the pickle {name!r}: {e}. It is corrupt or not a CIFAR-10 "
            "python batch (which holds only a dict of arrays and lists). Delete it and use "
            "the binary distribution (`cifar-10-batches-bin/`), which needs no pickle."
        ) from e


def read_cifar_pickle(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one python batch: `(images uint8 (N, 3, 32, 32), labels int32 (N,))`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        batch = safe_load_pickle(f.read(), path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path!r} holds a {type(batch).__name__}, expected a dict batch.")
    entries = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in entries or "labels" not in entries:
        raise ValueError(
            f"{path!r} has keys {sorted(entries)}; a CIFAR-10 batch has 'data' and 'labels'."
        )
    data = np.asarray(entries["data"])
    labels = np.asarray(entries["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path!r}: 'data' is {data.dtype} of shape {data.shape}; expected uint8 of shape "
            "(N, 3072)."
        )
    if labels.shape != (len(data),):
        raise ValueError(f"{path!r}: {len(data)} images but 'labels' has shape {labels.shape}.")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int32)
