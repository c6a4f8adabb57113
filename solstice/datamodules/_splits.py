"""Holding out a validation split, deterministically by seed."""

import jax
import numpy as np
from jaxtyping import PyTree


def check_fraction(name: str, fraction: float) -> None:
    """Raise `ValueError` unless `0 <= fraction < 1`."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise TypeError(f"`{name}` must be a number in [0, 1), got {fraction!r}.")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {fraction!r}.")


def split_off(arrays: PyTree, fraction: float, seed: int) -> tuple[PyTree, PyTree | None]:
    """Split `arrays` (leading axis = examples) into `(rest, held_out)`.

    `held_out` is a random `fraction` of the examples, drawn from `seed` (`None` if it would
    be empty); both parts keep the stored order of their examples.
    """
    n = len(jax.tree.leaves(arrays)[0])
    n_out = int(round(fraction * n))
    if n_out == 0:
        return arrays, None
    order = np.random.default_rng(seed).permutation(n)
    held, rest = np.sort(order[:n_out]), np.sort(order[n_out:])

    def take(idx: np.ndarray) -> PyTree:
        return jax.tree.map(lambda a: np.take(a, idx, axis=0), arrays)

    return take(rest), take(held)
