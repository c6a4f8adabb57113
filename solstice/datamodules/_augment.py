"""Random augmentation on the device, keyed by (seed, step) so it is exact on resume."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .._checks import check_int


class StepKeyed:
    """Turns `augment(batch, key)` into `fn(batch, step)` with
    `key = jax.random.fold_in(jax.random.key(seed), step)`.

    Two `StepKeyed` of the same function and seed compare equal (so a compiled step that takes
    one as a static argument is not recompiled).

    **Arguments:**

    - `augment`: a pure jax function `(batch, key) -> batch`.
    - `seed`: the seed of the run's data.

    **Example:**

    ```python
    transform = StepKeyed(RandomCropFlip(padding=4), seed=0)
    batch = jax.jit(transform)(batch, jnp.int32(step))
    ```
    """

    def __init__(self, augment: Callable[[PyTree, jax.Array], PyTree], seed: int):
        self.augment = augment
        self.seed = seed

    def key(self, step: Any) -> jax.Array:
        """The key of global step `step`."""
        return jax.random.fold_in(jax.random.key(self.seed), step)

    def __call__(self, batch: PyTree, step: Any) -> PyTree:
        return self.augment(batch, self.key(step))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StepKeyed)
            and other.augment == self.augment
            and other.seed == self.seed
        )

    def __hash__(self) -> int:
        return hash((StepKeyed, self.augment, self.seed))


class RandomCropFlip:
    """The standard CIFAR augmentation, per example: pad by `padding` pixels on each side,
    crop back to the original size at a random offset, and flip horizontally with
    probability 1/2.

    Works on a batch of channel-first images under `key` (`(batch, channels, height, width)`)
    inside `jit`; other entries pass through. Every random draw has the batch's leading shape,
    so the result does not depend on how the batch is sharded over devices.

    **Arguments:**

    - `padding`: pixels of padding on each side (4 for CIFAR).
    - `fill`: per-channel value of the padding (e.g. the normalised value of a black pixel,
      as `torchvision`'s `RandomCrop(32, padding=4)` pads before normalising); default 0.
    - `key`: the batch entry holding the images.
    - `flip`: also flip horizontally.

    **Example:**

    ```python
    augment = RandomCropFlip(padding=4)
    batch = augment({"image": images, "label": labels}, jax.random.key(0))
    ```
    """

    def __init__(
        self,
        padding: int = 4,
        fill: Sequence[float] | None = None,
        *,
        key: str = "image",
        flip: bool = True,
    ):
        check_int("padding", padding)
        self.padding = padding
        self.fill = None if fill is None else tuple(float(f) for f in fill)
        self.key = key
        self.flip = flip

    def __call__(self, batch: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
        x = jnp.asarray(batch[self.key])
        if x.ndim != 4:
            raise ValueError(
                f"`RandomCropFlip` expects channel-first images `(batch, channels, height, "
                f"width)` under `{self.key!r}`, got shape {tuple(x.shape)}."
            )
        n, c, h, w = x.shape
        p = self.padding
        crop_key, flip_key = jax.random.split(key)
        if p > 0:
            fill = np.zeros((c,), np.float32) if self.fill is None else np.asarray(self.fill)
            if fill.shape != (c,):
                raise ValueError(f"`fill` has {fill.size} values but the images have {c} channels.")
            canvas = jnp.broadcast_to(
                jnp.asarray(fill, x.dtype)[None, :, None, None], (n, c, h + 2 * p, w + 2 * p)
            )
            canvas = canvas.at[:, :, p : p + h, p : p + w].set(x)
            offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1, dtype=jnp.int32)

            def crop(image, offset):
                zero = jnp.zeros((), jnp.int32)
                return jax.lax.dynamic_slice(image, (zero, offset[0], offset[1]), (c, h, w))

            x = jax.vmap(crop)(canvas, offsets)
        if self.flip:
            flips = jax.random.bernoulli(flip_key, 0.5, (n,))
            x = jnp.where(flips[:, None, None, None], x[..., ::-1], x)
        out = dict(batch)
        out[self.key] = x
        return out
