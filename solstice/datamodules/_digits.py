"""`Digits`: scikit-learn's bundled 8x8 handwritten digits (real data, no download)."""

import numpy as np
from jax.sharding import Mesh

from ._array import ArrayDataModule
from ._splits import check_fraction


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits as `(images, labels)`: float32 `(1797, 1, 8, 8)` in [0, 1]
    and int32 labels in [0, 10)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`Digits` reads scikit-learn's bundled digits. Install it with "
            "`pip install 'solstice[sklearn]'`."
        ) from e
    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0)[:, None, :, :]
    return images, data.target.astype(np.int32)


class Digits(ArrayDataModule):
    """1,797 real 8x8 handwritten digits (scikit-learn's copy of the UCI set), offline.

    Images are float32 in [0, 1] with a channel axis, shape `(1, 8, 8)`; labels are int32 in
    [0, 10). The split into train/val/test is a fixed permutation drawn from `seed`.

    **Arguments:**

    - `batch_size`, `eval_batch_size`, `shuffle`, `seed`: as in `ArrayDataModule`.
    - `val_fraction`, `test_fraction`: share of examples held out for validation and test.
    - `on_device`, `mesh`: keep the data on the devices (see `ArrayDataModule`).

    **Example:**

    ```python
    dm = Digits(batch_size=64)   # {"image": (64, 1, 8, 8) float32, "label": (64,) int32}
    ```
    """

    num_classes = 10
    image_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        *,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        shuffle: bool = True,
        seed: int = 0,
        on_device: bool = False,
        mesh: Mesh | None = None,
    ):
        check_fraction("val_fraction", val_fraction)
        check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"`val_fraction + test_fraction` = {val_fraction + test_fraction} leaves no "
                "training data; keep their sum below 1."
            )
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle=shuffle,
            seed=seed,
            on_device=on_device,
            mesh=mesh,
        )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str) -> None:
        if self.splits["train"] is not None:
            return
        images, labels = load_digits_arrays()
        order = np.random.default_rng(self.seed).permutation(len(labels))
        n_test = int(round(self.test_fraction * len(labels)))
        n_val = int(round(self.val_fraction * len(labels)))
        test, val, train = np.split(order, [n_test, n_test + n_val])

        def take(idx):
            return {"image": images[idx], "label": labels[idx]}

        self.splits = {
            "train": take(train),
            "val": take(val) if n_val else None,
            "test": take(test) if n_test else None,
            "predict": take(test) if n_test else None,
        }
