"""The Trainer applies a DataModule's `device_transform` inside the compiled train step, keyed
by the global step; and a long multi-device run does not deadlock (bounded in-flight steps)."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import blobs, make_mlp_experiment, params_of

import solstice
from solstice.datamodules import ArrayDataModule


def _noise(batch, key):
    noise = 0.5 * jax.random.normal(key, batch["image"].shape, batch["image"].dtype)
    return {**batch, "image": batch["image"] + noise}


def _fit(augment, *, epochs=2, devices=1, **kw):
    dm = ArrayDataModule(train=blobs(128), val=blobs(40, seed=1), batch_size=32, augment=augment)
    trainer = solstice.Trainer(max_epochs=epochs, enable_progress_bar=False, devices=devices, **kw)
    exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), dm)
    return trainer, exp


def test_augmentation_runs_inside_the_train_step_deterministically():
    plain = params_of(_fit(None)[1])
    noisy_a = params_of(_fit(_noise)[1])
    noisy_b = params_of(_fit(_noise)[1])
    for p, a, b in zip(plain, noisy_a, noisy_b):
        assert not np.allclose(np.asarray(p), np.asarray(a))  # the transform changed training
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # ... deterministically


def test_augmentation_is_keyed_by_global_step_also_when_fused():
    """K=4 fused steps see the same per-step keys as single steps."""
    single = params_of(_fit(_noise)[1])
    fused = params_of(_fit(_noise, steps_per_execution=4, log_every_n_steps=4)[1])
    for a, b in zip(single, fused):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_transform_key_is_the_global_step():
    keys = []

    def capture(batch, key):
        keys.append(key)
        return batch

    dm = ArrayDataModule(train=blobs(64), batch_size=32, augment=capture, seed=3)
    transform = dm.device_transform
    batch = {k: jnp.asarray(v[:32]) for k, v in blobs(32).items()}
    transform(batch, jnp.int32(5))
    expected = jax.random.fold_in(jax.random.key(3), 5)
    assert jnp.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(expected))


def test_long_multi_device_run_does_not_deadlock():
    # ~300 asynchronously dispatched 4-device steps with all-reduces used to hang the CPU
    # backend; the Trainer bounds the steps in flight.
    dm = ArrayDataModule(train=blobs(512), batch_size=16)
    trainer = solstice.Trainer(
        max_steps=320, enable_progress_bar=False, devices=4, log_every_n_steps=1000
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), dm)
    assert trainer.global_step == 320
