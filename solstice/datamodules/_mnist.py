"""`MNIST` and `FashionMNIST`: the four IDX files in torchvision's layout."""

import os
from typing import ClassVar

import numpy as np
from jax.sharding import Mesh

from ..storage._paths import check_path, is_remote, local_cache, url_join
from ._array import ArrayDataModule
from ._decode import PixelDecode
from ._download import download
from ._idx import read_idx
from ._splits import check_fraction, split_off


class IDXImageDataModule(ArrayDataModule):
    """Shared code of `MNIST` and `FashionMNIST`: 28x28 grayscale images in IDX files.

    Subclasses name the `folder` under `data_dir` (torchvision's layout,
    `data_dir/<folder>/raw/`), the download `mirrors` and the four `resources` (file name ->
    MD5 of the gzipped file). The arguments are `MNIST`'s.

    **Example:**

    ```python
    class KMNIST(IDXImageDataModule):
        folder = "KMNIST"
        mirrors = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
        resources = {...}   # the four .gz files and their MD5s
        classes = tuple("o ki su tsu na ha ma ya re wo".split())
    ```
    """

    folder: ClassVar[str]
    mirrors: ClassVar[tuple[str, ...]]
    resources: ClassVar[dict[str, str]]  # file name (.gz) -> md5
    classes: ClassVar[tuple[str, ...]]
    num_classes = 10
    image_shape = (1, 28, 28)

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int = 128,
        *,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        shuffle: bool = True,
        seed: int = 0,
        download: bool = True,
        on_device: bool = False,
        mesh: Mesh | None = None,
    ):
        check_fraction("val_fraction", val_fraction)
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle=shuffle,
            seed=seed,
            on_device=on_device,
            mesh=mesh,
            transform=PixelDecode(),
        )
        location = check_path(data_dir, f"{type(self).__name__}(data_dir=...)")
        # remote storage (`s3://bucket/datasets`): a mirror read first, cached locally
        self.remote_dir = location if is_remote(location) else None
        self.data_dir = str(local_cache(location, "datasets")) if self.remote_dir else location
        self.val_fraction = val_fraction
        self.download = download

    @property
    def raw_dir(self) -> str:
        """Where the IDX files live: `data_dir/<folder>/raw`, as torchvision lays them out."""
        return os.path.join(self.data_dir, self.folder, "raw")

    def _existing(self, name: str) -> str | None:
        # torchvision keeps the .gz and its decompressed copy side by side; take either.
        for candidate in (name.removesuffix(".gz"), name):
            path = os.path.join(self.raw_dir, candidate)
            if os.path.isfile(path):
                return path
        return None

    def _missing(self) -> list[str]:
        return [name for name in self.resources if self._existing(name) is None]

    def prepare_data(self) -> None:
        """Download the missing IDX files (if `download=True`), verifying their MD5."""
        missing = self._missing()
        if not missing:
            return
        how = (
            f"Download them from {self.mirrors[0]} (or another mirror) into {self.raw_dir!r}, "
            f"gzipped or not, or copy an existing torchvision `{self.folder}` download there"
        )
        if not self.download:
            raise FileNotFoundError(
                f"{type(self).__name__}: missing {missing} in {self.raw_dir!r} and "
                f"`download=False`. {how}, or pass `download=True`."
            )
        mirrors = self.mirrors
        if self.remote_dir is not None:
            mirrors = (url_join(self.remote_dir, self.folder, "raw") + "/", *mirrors)
        for name in missing:
            urls = [mirror + name for mirror in mirrors]
            try:
                download(urls, os.path.join(self.raw_dir, name), "md5:" + self.resources[name])
            except ConnectionError as e:
                raise FileNotFoundError(
                    f"{type(self).__name__}: missing {missing} in {self.raw_dir!r} and the "
                    f"download failed (offline?). {how}.\n{e}"
                ) from e

    def _path(self, name: str) -> str:
        path = self._existing(name)
        if path is None:
            raise FileNotFoundError(
                f"{type(self).__name__}: {name!r} is missing from {self.raw_dir!r}; call "
                "`prepare_data()` with `download=True`, or put the file there."
            )
        return path

    def _read_pair(self, prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images_path = self._path(f"{prefix}-images-idx3-ubyte.gz")
        labels_path = self._path(f"{prefix}-labels-idx1-ubyte.gz")
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(
                f"{images_path!r} holds {images.dtype} data of shape {images.shape}; expected "
                "uint8 images of shape (N, 28, 28)."
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(
                f"{labels_path!r} holds {labels.dtype} data of shape {labels.shape}; expected "
                "uint8 labels of shape (N,)."
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path!r} has {len(images)} images but {labels_path!r} has "
                f"{len(labels)} labels; one of them is from another dataset or corrupt."
            )
        if len(labels) and labels.max() >= self.num_classes:
            raise ValueError(
                f"{labels_path!r} has label {int(labels.max())}; expected labels in "
                f"[0, {self.num_classes})."
            )
        return images[:, None, :, :], labels.astype(np.int32)

    def setup(self, stage: str) -> None:
        """Read the IDX files (downloading them first if needed) and split off validation."""
        if self.splits["train"] is not None:
            return
        self.prepare_data()
        train_images, train_labels = self._read_pair("train")
        test_images, test_labels = self._read_pair("t10k")
        train, val = split_off(
            {"image": train_images, "label": train_labels}, self.val_fraction, self.seed
        )
        test = {"image": test_images, "label": test_labels}
        self.splits = {"train": train, "val": val, "test": test, "predict": test}


class MNIST(IDXImageDataModule):
    """The MNIST handwritten digits: 60,000 training and 10,000 test images, 28x28.

    Reads the four IDX files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzipped or not) from
    `data_dir/MNIST/raw/`, the layout torchvision uses, so an existing torchvision download is
    reused. Missing files are downloaded from torchvision's mirrors with MD5 verification
    and placed atomically.

    Batches are `{"image": float32 (B, 1, 28, 28) in [0, 1], "label": int32 (B,)}`; the
    last evaluation batch may be shorter. The validation split is a fixed random
    `val_fraction` of the 60,000 training images (drawn from `seed`); the test split (also
    used for predict) is the 10,000 test images. Pixels are kept as `uint8` and decoded per
    batch: a `float32` copy would take 4x the memory (188 MB) and, as shuffled rows are
    gathered from main memory, batches would be slower. The Trainer uploads the `uint8`
    batches and decodes them inside its compiled step (see `BatchLoader.split_transform`);
    iterating a loader directly gives decoded `float32` batches.

    **Arguments:**

    - `data_dir`: the data root (`MNIST/raw/` is below it); or a URL of remote storage
      (`"s3://bucket/datasets"`), read first as a mirror (then the official ones), each
      file verified by its MD5 and cached locally (see `docs/storage.md`).
    - `batch_size`, `eval_batch_size`, `shuffle`, `seed`: as in `ArrayDataModule`.
    - `val_fraction`: share of the training images held out for validation (0 = none).
    - `download`: download missing files; if `False`, missing files raise
      `FileNotFoundError`.
    - `on_device`, `mesh`: keep the data on the devices (see `ArrayDataModule`).

    **Example:**

    ```python
    dm = MNIST("data", batch_size=128)
    dm.prepare_data(); dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))   # {"image": (128, 1, 28, 28), "label": (128,)}
    ```
    """

    folder = "MNIST"
    mirrors = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    resources = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    classes = tuple(str(i) for i in range(10))


class FashionMNIST(IDXImageDataModule):
    """Zalando's Fashion-MNIST: 60,000 training and 10,000 test 28x28 clothing images.

    The same format, layout (`data_dir/FashionMNIST/raw/`), batches and arguments as
    `MNIST`; files are downloaded from Zalando's mirror with MD5 verification. Class names are
    in `FashionMNIST.classes`.

    **Example:**

    ```python
    dm = FashionMNIST("data", batch_size=256, on_device=True)
    ```
    """

    folder = "FashionMNIST"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    resources = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    classes = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
