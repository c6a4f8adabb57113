"""On-disk formats: IDX (gzipped and raw), CIFAR-10 binary and python pickles.

The writers here build files byte by byte from the published format descriptions, not with
Solstice's own code, so the readers are checked against the formats themselves.
"""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from solstice.datamodules import CIFAR10, MNIST, FashionMNIST
from solstice.datamodules._cifar_files import SafeUnpickler, read_cifar_binary
from solstice.datamodules._idx import parse_idx, read_idx, write_idx

pytestmark = pytest.mark.usefixtures("strict_promotion")

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# ---------------------------------------------------------------------------------------------
# writers (also used by test_datamodules.py)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0x0000, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    code = {
        np.dtype(np.uint8): 0x08,
        np.dtype(np.int8): 0x09,
        np.dtype(np.int16): 0x0B,
        np.dtype(np.int32): 0x0C,
        np.dtype(np.float32): 0x0D,
        np.dtype(np.float64): 0x0E,
    }[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist_files(root, *, folder="MNIST", n_train=120, n_test=30, gz=True, seed=0):
    """Write the four IDX files into `root/folder/raw/`; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for key, name in MNIST_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            with gzip.open(os.path.join(raw, name + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(raw, name), "wb") as f:
                f.write(data)
    return arrays


def _cifar_arrays(n_per_batch, n_test, seed):
    rng = np.random.default_rng(seed)
    sizes = [n_per_batch] * 5 + [n_test]
    return [
        (
            rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, (n,), dtype=np.uint8),
        )
        for n in sizes
    ]


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_binary(root, *, n_per_batch=16, n_test=20, seed=0):
    """`root/cifar-10-batches-bin/*.bin`: records of 1 label byte + 3072 pixel bytes."""
    folder = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(folder, exist_ok=True)
    parts = _cifar_arrays(n_per_batch, n_test, seed)
    for name, (images, labels) in zip(CIFAR_NAMES, parts):
        records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
        with open(os.path.join(folder, name + ".bin"), "wb") as f:
            f.write(records.astype(np.uint8).tobytes())
    return parts


def write_cifar_python(root, *, n_per_batch=16, n_test=20, seed=0, protocol=2, bytes_keys=False):
    """`root/cifar-10-batches-py/*`: pickled dicts with `data` (N, 3072) and `labels`."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    parts = _cifar_arrays(n_per_batch, n_test, seed)
    for name, (images, labels) in zip(CIFAR_NAMES, parts):
        batch = {
            "batch_label": f"{name} of 6",
            "labels": [int(v) for v in labels],
            "data": images.reshape(len(images), -1),
            "filenames": [f"img_{i}.png" for i in range(len(images))],
        }
        if bytes_keys:  # what Python 2 pickles look like when read with encoding="bytes"
            batch = {k.encode(): v for k, v in batch.items()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return parts


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_every_dtype_round_trip(tmp_path, dtype):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)
    write_idx(tmp_path / "y.idx.gz", array)  # Solstice's writer agrees with the format
    np.testing.assert_array_equal(read_idx(tmp_path / "y.idx.gz"), array)
    assert gzip.decompress((tmp_path / "y.idx.gz").read_bytes()) == idx_bytes(array)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_pixels_exactly(tmp_path, gz):
    arrays = write_mnist_files(tmp_path, gz=gz)
    dm = MNIST(tmp_path, batch_size=8, val_fraction=0.0, shuffle=False, download=False)
    dm.setup("fit")
    assert dm.splits["val"] is None
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (8, 1, 28, 28) and train["image"].dtype == np.float32
    assert train["label"].dtype == np.int32
    # the stored pixels are the file's bytes; decoded they are x / 255 to within about one ulp
    np.testing.assert_array_equal(dm.splits["train"]["image"][:, 0], arrays["train_images"])
    np.testing.assert_allclose(
        train["image"][:, 0], arrays["train_images"][:8] / 255.0, rtol=0, atol=1e-7
    )
    np.testing.assert_array_equal(train["label"], arrays["train_labels"][:8])
    assert float(train["image"].min()) >= 0.0 and float(train["image"].max()) <= 1.0
    test = list(dm.test_dataloader())
    images = np.concatenate([np.asarray(b["image"]) for b in test])  # real rows only
    np.testing.assert_array_equal(
        np.round(images[:, 0] * np.float32(255)).astype(np.uint8), arrays["test_images"]
    )
    np.testing.assert_array_equal(dm.splits["test"]["label"], arrays["test_labels"])


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    write_mnist_files(tmp_path, folder="FashionMNIST", gz=False)
    dm = FashionMNIST(tmp_path, batch_size=8, download=False)
    dm.setup("fit")
    assert dm.raw_dir == os.path.join(tmp_path, "FashionMNIST", "raw")
    assert len(FashionMNIST.classes) == 10
    with pytest.raises(FileNotFoundError, match="MNIST"):
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")


def test_mnist_prefers_decompressed_copy_like_torchvision(tmp_path):
    # torchvision keeps `x.gz` and the decompressed `x` side by side
    arrays = write_mnist_files(tmp_path, gz=True)
    write_mnist_files(tmp_path, gz=False, seed=0)
    dm = MNIST(tmp_path, batch_size=8, val_fraction=0.0, shuffle=False, download=False)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.splits["train"]["image"][:, 0], arrays["train_images"])


def test_idx_truncated_file_names_file_and_sizes(tmp_path):
    write_mnist_files(tmp_path, gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError) as info:
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "truncated" in message
    assert str(len(data)) in message and str(len(data) - 100) in message


def test_idx_truncated_gzip_names_file(tmp_path):
    write_mnist_files(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")


def test_idx_header_errors():
    with pytest.raises(ValueError, match="magic number"):
        parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad.idx")
    with pytest.raises(ValueError, match="truncated.*3 dimensions"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00", "short.idx")
    with pytest.raises(ValueError, match="trailing bytes"):
        parse_idx(idx_bytes(np.zeros((2,), np.uint8)) + b"\x00", "long.idx")


def test_mnist_rejects_mismatched_files(tmp_path):
    arrays = write_mnist_files(tmp_path, gz=False)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(arrays["train_labels"][:-1]))
    with pytest.raises(ValueError, match="120 images but .* 119 labels"):
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")
    labels = arrays["train_labels"].copy()
    labels[3] = 10
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match=r"label 10; expected labels in \[0, 10\)"):
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((120, 28, 27), np.uint8)))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        MNIST(tmp_path, batch_size=8, download=False).setup("fit")


def test_mnist_missing_files_offline(tmp_path):
    write_mnist_files(tmp_path, gz=True)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(FileNotFoundError) as info:
        MNIST(tmp_path, batch_size=8, download=False).prepare_data()
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message and "train-images" not in message
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message
    assert "download=True" in message and "ossci-datasets" in message


def test_mnist_split_is_deterministic_by_seed(tmp_path):
    write_mnist_files(tmp_path)

    def val_labels(seed):
        dm = MNIST(tmp_path, batch_size=8, val_fraction=0.25, seed=seed, download=False)
        dm.setup("fit")
        assert len(dm.splits["val"]["label"]) == 30 and len(dm.splits["train"]["label"]) == 90
        return dm.splits["val"]["image"]

    np.testing.assert_array_equal(val_labels(0), val_labels(0))
    assert not np.array_equal(val_labels(0), val_labels(1))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def _expected_cifar(parts, normalize):
    images = np.concatenate([p[0] for p in parts[:5]]).astype(np.float64) / 255.0
    if normalize:
        mean = np.asarray(CIFAR10.mean)[None, :, None, None]
        std = np.asarray(CIFAR10.std)[None, :, None, None]
        images = (images - mean) / std
    return images.astype(np.float32), np.concatenate([p[1] for p in parts[:5]])


@pytest.mark.parametrize("normalize", [True, False])
def test_cifar_binary_pixels_exactly(tmp_path, normalize):
    parts = write_cifar_binary(tmp_path)
    dm = CIFAR10(
        tmp_path,
        batch_size=16,
        val_fraction=0.0,
        shuffle=False,
        normalize=normalize,
        download=False,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    expected_images, expected_labels = _expected_cifar(parts, normalize)
    assert images.shape == (80, 3, 32, 32) and images.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(images, expected_images, rtol=0, atol=1e-6)
    if not normalize:
        np.testing.assert_array_equal(
            np.round(images * 255).astype(np.uint8), np.concatenate([p[0] for p in parts[:5]])
        )
    test = list(dm.test_dataloader())
    assert sum(len(b["label"]) for b in test) == 20
    # channel layout: the first 1024 pixel bytes of a record are the red plane
    record = (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()[:3073]
    red = np.frombuffer(record[1:1025], np.uint8).reshape(32, 32)
    np.testing.assert_array_equal(dm.splits["train"]["image"][0, 0], red)


@pytest.mark.parametrize("protocol,bytes_keys", [(2, False), (2, True), (5, False)])
def test_cifar_python_pickles_read_safely(tmp_path, protocol, bytes_keys):
    parts = write_cifar_python(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    dm = CIFAR10(tmp_path, batch_size=16, val_fraction=0.0, shuffle=False, download=False)
    dm.setup("fit")
    np.testing.assert_array_equal(
        dm.splits["train"]["image"], np.concatenate([p[0] for p in parts[:5]])
    )
    np.testing.assert_array_equal(dm.splits["test"]["label"], parts[5][1])
    assert dm.splits["train"]["label"].dtype == np.int32


def test_cifar_binary_preferred_over_pickles(tmp_path):
    parts = write_cifar_binary(tmp_path, seed=1)
    write_cifar_python(tmp_path, seed=2)
    dm = CIFAR10(tmp_path, batch_size=16, val_fraction=0.0, download=False)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.splits["test"]["image"], parts[5][0])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize(
    "payload",
    [
        {"data": _Evil(), "labels": []},
        {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Evil()},
    ],
)
def test_cifar_malicious_pickle_is_refused(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    write_cifar_python(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    dm = CIFAR10(tmp_path, batch_size=16, download=False)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "data_batch_3" in message and "system" in message and "refusing" in message
    assert not (tmp_path / "pwned.txt").exists()


def test_safe_unpickler_refuses_builtins():
    import io

    for dangerous in (eval, exec, getattr, __import__):
        data = pickle.dumps(dangerous)
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            SafeUnpickler(io.BytesIO(data)).load()


def test_cifar_truncated_binary_names_file_and_sizes(tmp_path):
    write_cifar_binary(tmp_path, n_per_batch=16)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError) as info:
        CIFAR10(tmp_path, batch_size=16, download=False).setup("fit")
    message = str(info.value)
    assert "data_batch_2.bin" in message
    assert str(16 * 3073 - 10) in message and str(15 * 3073) in message
    with pytest.raises(ValueError, match="data_batch_2.bin"):
        read_cifar_binary(path)


def test_cifar_bad_label_names_file(tmp_path):
    write_cifar_binary(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    data = bytearray(path.read_bytes())
    data[3073] = 12  # label of the second record
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"test_batch.bin.*label 12"):
        CIFAR10(tmp_path, batch_size=16, download=False).setup("fit")


def test_cifar_missing_offline(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10(tmp_path, batch_size=16, download=False).prepare_data()
    message = str(info.value)
    assert "data_batch_1.bin" in message and "cifar-10-binary.tar.gz" in message
    assert str(tmp_path) in message
