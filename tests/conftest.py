"""Test configuration: several fake CPU devices, warnings as errors (see pyproject).

Strict dtype promotion is not global: optax's own transformations (e.g. adam's bias
correction, `decay ** count`) rely on standard promotion. Tests of Solstice's own numerics
use the `strict_promotion` fixture instead.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def getkey():
    """Return a function producing fresh, deterministic PRNG keys."""
    state = {"key": jax.random.key(0)}

    def _getkey():
        state["key"], sub = jax.random.split(state["key"])
        return sub

    return _getkey


@pytest.fixture
def strict_promotion():
    """Run the test under `jax_numpy_dtype_promotion="strict"`."""
    with jax.numpy_dtype_promotion("strict"):
        yield
