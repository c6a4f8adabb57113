"""`CIFAR10`: the binary distribution (or torchvision's pickles, read safely)."""

import os

import numpy as np
from jax.sharding import Mesh

from ..storage._paths import check_path, is_remote, local_cache, url_join
from ._archive import safe_extract
from ._array import ArrayDataModule
from ._augment import RandomCropFlip
from ._cifar_files import read_cifar_binary, read_cifar_pickle
from ._decode import PixelDecode
from ._download import download, file_hash
from ._splits import check_fraction, split_off

BINARY_DIR = "cifar-10-batches-bin"
PYTHON_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


class CIFAR10(ArrayDataModule):
    """CIFAR-10: 50,000 training and 10,000 test 32x32 colour images of 10 classes.

    Reads the binary distribution from `data_dir/cifar-10-batches-bin/` (`data_batch_1.bin`
    ... `data_batch_5.bin`, `test_batch.bin`: plain bytes, no pickle). If only torchvision's
    python copy `data_dir/cifar-10-batches-py/` is there, it is read with an unpickler that
    builds nothing but plain containers, bytes and numpy arrays. If neither is present and
    `download=True`, the official `cifar-10-binary.tar.gz` is downloaded, its MD5 checked,
    and its six batch files extracted safely (no absolute paths, `..` or links) and placed
    atomically.

    Batches are `{"image": float32 (B, 3, 32, 32), "label": int32 (B,)}` (the last evaluation
    batch may be shorter). With `normalize=True` each channel is standardised with the
    CIFAR-10 training-set statistics `CIFAR10.mean` / `CIFAR10.std` (of pixels in [0, 1]);
    otherwise pixels are in [0, 1]. The validation split is a fixed random `val_fraction` of
    the training images (drawn from `seed`); test (and predict) is the 10,000 test images.

    With `augment=True`, training batches get the standard augmentation (random crop
    with 4 pixels of padding, random horizontal flip) on the device: the Trainer applies
    `self.device_transform(batch, step)` to each training batch inside its compiled step,
    keyed by `(seed, step)`, so it is deterministic and exact on resume. Evaluation batches
    are never augmented.

    **Arguments:**

    - `data_dir`: the data root; or a URL of remote storage (`"s3://bucket/datasets"`)
      holding `cifar-10-binary.tar.gz`, read first (then the official address), verified by
      its MD5 and extracted into a local cache (see `docs/storage.md`).
    - `batch_size`, `eval_batch_size`, `shuffle`, `seed`: as in `ArrayDataModule`.
    - `val_fraction`: share of the training images held out for validation (0 = none).
    - `augment`: random crop + flip of training batches on the device.
    - `normalize`: standardise each channel.
    - `download`: download if missing; if `False`, missing files raise `FileNotFoundError`.
    - `on_device`, `mesh`: keep the data on the devices (see `ArrayDataModule`).

    **Example:**

    ```python
    dm = CIFAR10("data", batch_size=256, augment=True, on_device=True)
    ```
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    md5 = "c32a1d4ab5d03f1284b67883e8d87530"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    classes = (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    num_classes = 10
    image_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int = 128,
        *,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        augment: bool = False,
        normalize: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        download: bool = True,
        on_device: bool = False,
        mesh: Mesh | None = None,
    ):
        check_fraction("val_fraction", val_fraction)
        decode = PixelDecode(self.mean, self.std) if normalize else PixelDecode()
        fill = np.broadcast_to(decode.fill_value(), (3,))
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle=shuffle,
            seed=seed,
            on_device=on_device,
            mesh=mesh,
            transform=decode,
            augment=RandomCropFlip(padding=4, fill=tuple(float(f) for f in fill))
            if augment
            else None,
        )
        location = check_path(data_dir, "CIFAR10(data_dir=...)")
        # remote storage (`s3://bucket/datasets`): the archive is read from there first
        # (a mirror), and extracted into a local cache
        self.remote_dir = location if is_remote(location) else None
        self.data_dir = str(local_cache(location, "datasets")) if self.remote_dir else location
        self.val_fraction = val_fraction
        self.normalize = normalize
        self.download = download

    def _files(self, folder: str, suffix: str) -> list[str]:
        names = [*TRAIN_BATCHES, TEST_BATCH]
        return [os.path.join(self.data_dir, folder, name + suffix) for name in names]

    def _source(self) -> tuple[list[str], bool] | None:
        """The six batch files and whether they are pickles, or `None` if incomplete."""
        binary = self._files(BINARY_DIR, ".bin")
        if all(os.path.isfile(p) for p in binary):
            return binary, False
        python = self._files(PYTHON_DIR, "")
        if all(os.path.isfile(p) for p in python):
            return python, True
        return None

    def prepare_data(self) -> None:
        """Download and extract the binary distribution if no complete copy is present."""
        if self._source() is not None:
            return
        missing = [
            os.path.basename(p) for p in self._files(BINARY_DIR, ".bin") if not os.path.isfile(p)
        ]
        how = (
            f"Download {self.url} (md5 {self.md5}) and extract it into {self.data_dir!r} "
            f"(`tar -xzf cifar-10-binary.tar.gz -C {self.data_dir}`)"
        )
        where = os.path.join(self.data_dir, BINARY_DIR)
        if not self.download:
            raise FileNotFoundError(
                f"CIFAR10: missing {missing} in {where!r} (and no complete "
                f"{PYTHON_DIR!r} copy) and `download=False`. {how}, or pass `download=True`."
            )
        archive = os.path.join(self.data_dir, os.path.basename(self.url))
        if os.path.isfile(archive):
            actual = file_hash(archive, "md5")
            if actual != self.md5:
                raise ValueError(
                    f"{archive!r} has md5 {actual}, expected {self.md5}: it is corrupt or "
                    "another file. Delete it and run again to download it afresh."
                )
        else:
            try:
                sources = [self.url]
                if self.remote_dir is not None:
                    sources.insert(0, url_join(self.remote_dir, os.path.basename(self.url)))
                download(sources, archive, "md5:" + self.md5)
            except ConnectionError as e:
                raise FileNotFoundError(
                    f"CIFAR10: missing {missing} in {where!r} and the download failed "
                    f"(offline?). {how}.\n{e}"
                ) from e
        members = [f"{BINARY_DIR}/{os.path.basename(p)}" for p in self._files(BINARY_DIR, ".bin")]
        safe_extract(archive, self.data_dir, members=members)

    def setup(self, stage: str) -> None:
        """Read the six batch files (downloading first if needed); split off validation."""
        if self.splits["train"] is not None:
            return
        self.prepare_data()
        source = self._source()
        if source is None:  # pragma: no cover - prepare_data guarantees a source
            raise FileNotFoundError(f"CIFAR10: no complete copy in {self.data_dir!r}.")
        paths, pickled = source
        read = read_cifar_pickle if pickled else read_cifar_binary
        parts = [read(p) for p in paths]
        for path, (_, labels) in zip(paths, parts):
            if len(labels) and labels.max() >= self.num_classes:
                raise ValueError(
                    f"{path!r} has label {int(labels.max())}; expected labels in "
                    f"[0, {self.num_classes})."
                )
        train = {
            "image": np.concatenate([images for images, _ in parts[:-1]]),
            "label": np.concatenate([labels for _, labels in parts[:-1]]),
        }
        test = {"image": parts[-1][0], "label": parts[-1][1]}
        train, val = split_off(train, self.val_fraction, self.seed)
        self.splits = {"train": train, "val": val, "test": test, "predict": test}
