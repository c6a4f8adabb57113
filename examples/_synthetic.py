"""Small, format-exact stand-ins for the MNIST and CIFAR-10 files, for smoke runs offline.

The examples' `--smoke` / `smoke=true` modes write these into a temporary directory and point
the real `MNIST` / `CIFAR10` DataModules at it, so a smoke run goes through exactly the code
a real run does: the files are parsed, decoded, split, batched, sharded and trained on.

The bytes are written from the published format descriptions, not with Solstice's readers:

- IDX (MNIST): two zero bytes, a dtype code (`0x08` = unsigned byte), the number of
  dimensions, one big-endian uint32 per dimension, then the data in C order; gzipped, named as
  in torchvision's `MNIST/raw/` folder.
- CIFAR-10 binary: records of 1 label byte then 3,072 pixel bytes (1,024 red, 1,024 green,
  1,024 blue, row-major), in `cifar-10-batches-bin/data_batch_{1..5}.bin` and `test_batch.bin`.

The images are not digits or photographs. Each class has a fixed random prototype and every
image is its class's prototype plus noise, so a model can learn them in a few steps: a smoke
run that ends above chance accuracy shows that images and labels stayed aligned all the way.
"""

import gzip
import os
import struct

import numpy as np

MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "train_images",
    "train-labels-idx1-ubyte.gz": "train_labels",
    "t10k-images-idx3-ubyte.gz": "test_images",
    "t10k-labels-idx1-ubyte.gz": "test_labels",
}
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"


def idx_bytes(array: np.ndarray) -> bytes:
    """The bytes of an IDX file holding `array` (unsigned bytes only, as MNIST uses)."""
    if array.dtype != np.uint8:
        raise TypeError(f"MNIST's IDX files hold uint8 data, got {array.dtype}.")
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def prototype_images(
    num_examples: int,
    shape: tuple[int, ...],
    *,
    num_classes: int = 10,
    noise: float = 40.0,
    block: int = 4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`num_examples` uint8 images of `shape` (channels first) and their int labels.

    Each class's prototype is random blocks of `block`x`block` pixels (so it survives a
    random crop); an image is its class's prototype plus Gaussian noise of std `noise`.
    The prototypes depend only on `num_classes`, `shape` and `block`, so training and test
    files written with different seeds share them.
    """
    proto_rng = np.random.default_rng(12345)
    *lead, height, width = shape
    coarse = proto_rng.uniform(
        30, 225, (num_classes, *lead, -(-height // block), -(-width // block))
    )
    protos = coarse.repeat(block, axis=-2).repeat(block, axis=-1)[..., :height, :width]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_examples)
    images = protos[labels] + rng.normal(0.0, noise, (num_examples, *shape))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def write_mnist(
    root: str | os.PathLike,
    *,
    num_train: int = 512,
    num_test: int = 128,
    folder: str = "MNIST",
    seed: int = 0,
) -> str:
    """Write the four gzipped MNIST IDX files into `root/folder/raw/`; return that folder.

    `MNIST(root, download=False)` then reads them as it reads the real files.
    """
    train_images, train_labels = prototype_images(num_train, (28, 28), seed=seed)
    test_images, test_labels = prototype_images(num_test, (28, 28), seed=seed + 1)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels.astype(np.uint8),
        "test_images": test_images,
        "test_labels": test_labels.astype(np.uint8),
    }
    raw = os.path.join(os.fspath(root), folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for name, key in MNIST_FILES.items():
        with gzip.open(os.path.join(raw, name), "wb") as f:
            f.write(idx_bytes(arrays[key]))
    return raw


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR-10 binary records: per image, 1 label byte then its 3,072 pixel bytes."""
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"Expected uint8 images (N, 3, 32, 32), got {images.dtype}{images.shape}.")
    flat = images.reshape(len(images), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], flat], axis=1).tobytes()


def write_cifar10(
    root: str | os.PathLike,
    *,
    num_per_batch: int = 128,
    num_test: int = 128,
    seed: int = 0,
) -> str:
    """Write the six CIFAR-10 binary batch files into `root/cifar-10-batches-bin/`.

    Five training batches of `num_per_batch` images and a test batch of `num_test`; return
    the folder. `CIFAR10(root, download=False)` then reads them as it reads the real files.
    """
    folder = os.path.join(os.fspath(root), "cifar-10-batches-bin")
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(CIFAR_TRAIN_FILES):
        images, labels = prototype_images(num_per_batch, (3, 32, 32), seed=seed + i)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(cifar_records(images, labels))
    images, labels = prototype_images(num_test, (3, 32, 32), seed=seed + len(CIFAR_TRAIN_FILES))
    with open(os.path.join(folder, CIFAR_TEST_FILE), "wb") as f:
        f.write(cifar_records(images, labels))
    return folder
