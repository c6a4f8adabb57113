"""`ColourMNIST`: grayscale digits coloured with a label-correlated bias (Kim et al., 2019)."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh
from jaxtyping import PyTree

from ._array import SPLITS, ArrayDataModule
from ._batching import batch_size_of
from ._decode import PixelDecode

#: The ten mean colours (RGB in [0, 1]); colour `k` is the bias of digit `k` in training.
MEAN_COLOURS = (
    np.array(
        [
            [255, 0, 0],  # red
            [0, 255, 0],  # green
            [0, 0, 255],  # blue
            [225, 225, 0],  # yellow
            [225, 0, 225],  # magenta
            [0, 255, 255],  # cyan
            [255, 128, 0],  # orange
            [255, 0, 128],  # pink
            [128, 0, 255],  # violet
            [128, 128, 128],  # grey
        ],
        dtype=np.float64,
    )
    / 255.0
)

_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, "predict": 3}
_RGB = "rgb"


class Colourise:
    """Batch transform: `image (B, 1, H, W)` x per-example `rgb (B, 3)` -> `(B, 3, H, W)`.

    Runs after the grayscale source's own decoding (`base`) and drops the `"rgb"` entry; the
    same code works on numpy (host) and jax (device) batches.
    """

    def __init__(self, base: Any = None):
        self.base = base

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        if self.base is not None:
            batch = self.base(batch)
        out = dict(batch)
        rgb = out.pop(_RGB)
        out["image"] = out["image"] * rgb[:, :, None, None]
        return out


class ColourMNIST(ArrayDataModule):
    """Colour-MNIST after Kim et al. 2019, "Learning Not to Learn" (CVPR): a digit dataset
    with a planted colour bias.

    Construction: ten fixed mean colours (`MEAN_COLOURS`, one per digit class). Each image's
    foreground (the grayscale digit, in [0, 1]) is multiplied by one RGB colour, so the
    background stays black:

    - training (and validation) split: the colour of a digit of class `k` is mean colour `k`
      plus Gaussian noise `N(0, variance)` drawn per image and channel, clipped to [0, 1].
      The colour predicts the label: this is the bias. `variance` sets its strength: the
      paper trains on `variance` (its sigma^2) in {0.020, 0.025, ..., 0.050}; smaller is more
      strongly biased.
    - test (and predict) split: the mean colour is drawn uniformly at random, independently
      of the label, with the same noise, so a model that learned colour fails there.

    Batches are `{"image": float32 (B, 3, H, W) in [0, 1], "label": int32 (B,),
    "colour": int32 (B,)}`, `"colour"` being the index of the mean colour (the bias label,
    equal to `"label"` in training). Colours are drawn once, in `setup`, from `seed` (one
    stream per split), so the dataset is a deterministic function of the source and `seed`;
    the colouring itself runs per batch (on the device with `on_device=True`), so memory
    holds only the grayscale digits and one RGB triple per image.

    **Arguments:**

    - `source`: the grayscale digits: an `ArrayDataModule` whose batches are
      `{"image": (B, 1, H, W), "label": (B,)}`, e.g. `MNIST(...)`, `FashionMNIST(...)` or
      `Digits()` (offline); its train/val/test splits are used. Or a mapping from split
      names (`"train"`, `"val"`, `"test"`, `"predict"`) to `{"image", "label"}` arrays,
      images `float` in [0, 1] or `uint8`.
    - `batch_size`, `eval_batch_size`: default to the source DataModule's.
    - `variance`: variance of the colour noise (the paper's sigma^2; 0.020 to 0.050).
    - `colours`: the ten mean colours, `(10, 3)` RGB in [0, 1] (default `MEAN_COLOURS`).
    - `shuffle`, `seed`, `on_device`, `mesh`: as in `ArrayDataModule`.

    **Example:**

    ```python
    dm = ColourMNIST(Digits(batch_size=64), variance=0.02)    # offline, real digits
    dm = ColourMNIST(MNIST("data", batch_size=128), variance=0.03, on_device=True)
    ```
    """

    num_classes = 10

    def __init__(
        self,
        source: ArrayDataModule | Mapping[str, PyTree],
        batch_size: int | None = None,
        *,
        variance: float = 0.02,
        colours: Sequence[Sequence[float]] | np.ndarray | None = None,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        on_device: bool = False,
        mesh: Mesh | None = None,
    ):
        if isinstance(source, ArrayDataModule):
            if batch_size is None:
                batch_size = source.batch_size
                eval_batch_size = eval_batch_size or source.eval_batch_size
        elif isinstance(source, Mapping):
            unknown = set(source) - set(SPLITS)
            if unknown or "train" not in source:
                raise ValueError(
                    f"A mapping `source` needs a 'train' split and only the splits {SPLITS}; "
                    f"got keys {sorted(source)}."
                )
            if batch_size is None:
                raise TypeError("`batch_size` is required when `source` is a mapping of arrays.")
        else:
            raise TypeError(
                "`source` must be an `ArrayDataModule` of grayscale digits (e.g. `MNIST(...)` "
                "or `Digits()`) or a mapping of splits to `{'image', 'label'}` arrays, got "
                f"{type(source).__name__}."
            )
        if isinstance(variance, bool) or not isinstance(variance, int | float) or variance < 0:
            raise ValueError(f"`variance` must be a non-negative number, got {variance!r}.")
        colours_ = MEAN_COLOURS if colours is None else np.asarray(colours, dtype=np.float64)
        if colours_.ndim != 2 or colours_.shape[1] != 3 or colours_.shape[0] < 2:
            raise ValueError(
                f"`colours` must be an array of RGB triples, shape (num_colours, 3), got "
                f"shape {colours_.shape}."
            )
        if np.any((colours_ < 0) | (colours_ > 1)):
            raise ValueError("`colours` must be RGB values in [0, 1].")
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle=shuffle,
            seed=seed,
            on_device=on_device,
            mesh=mesh,
        )
        self.source = source
        self.variance = float(variance)
        self.colours = colours_

    def prepare_data(self) -> None:
        if isinstance(self.source, ArrayDataModule):
            self.source.prepare_data()

    def _gray_splits(self, stage: str) -> tuple[dict[str, PyTree], Any]:
        if isinstance(self.source, ArrayDataModule):
            self.source.setup(stage)
            return dict(self.source.splits), self.source.transform
        splits = {name: self.source.get(name) for name in SPLITS}
        train: Any = splits["train"]
        image = np.asarray(train["image"])
        return splits, PixelDecode() if image.dtype == np.uint8 else None

    def _colour(self, name: str, arrays: PyTree) -> dict[str, np.ndarray]:
        if not isinstance(arrays, Mapping) or "image" not in arrays or "label" not in arrays:
            raise ValueError(
                f"The source's {name!r} split must be a dict with 'image' and 'label', got "
                f"{type(arrays).__name__} with {sorted(arrays) if isinstance(arrays, Mapping) else '-'}."
            )
        batch_size_of(arrays)
        image, label = np.asarray(arrays["image"]), np.asarray(arrays["label"])
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(
                f"ColourMNIST colours grayscale digits `(N, 1, H, W)`, but the source's {name!r} "
                f"images have shape {image.shape}."
            )
        k = len(self.colours)
        if label.size and (label.min() < 0 or label.max() >= k):
            raise ValueError(
                f"The source's {name!r} labels span [{label.min()}, {label.max()}], but there "
                f"are {k} mean colours; pass `colours=` with one colour per class."
            )
        n = len(label)
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[name]])
        biased = name in ("train", "val")
        colour = label.astype(np.int64) if biased else rng.integers(0, k, size=n)
        noise = rng.normal(0.0, np.sqrt(self.variance), size=(n, 3))
        rgb = np.clip(self.colours[colour] + noise, 0.0, 1.0).astype(np.float32)
        return {
            "image": image,
            "label": label.astype(np.int32),
            "colour": colour.astype(np.int32),
            _RGB: rgb,
        }

    def setup(self, stage: str) -> None:
        """Load the source's digits and draw every image's colour (once)."""
        if self.splits["train"] is not None:
            return
        gray, base = self._gray_splits(stage)
        splits: dict[str, PyTree | None] = {}
        for name in SPLITS:
            arrays = gray.get(name)
            if arrays is None:
                splits[name] = None
            elif name == "predict" and arrays is gray.get("test"):
                splits[name] = splits["test"]
            else:
                splits[name] = self._colour(name, arrays)
        self.transform = Colourise(base)
        self.splits = splits
