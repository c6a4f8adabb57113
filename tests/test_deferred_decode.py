"""Host batches travel to the device before their transform (e.g. as `uint8` pixels) and are
decoded inside the compiled steps, with the results of decoding them on the host."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import params_of

import solstice
from solstice.datamodules import ArrayDataModule
from solstice.datamodules._decode import PixelDecode
from solstice.datamodules._loader import BatchLoader
from solstice.trainer import _train_input


def _pixels(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n).astype(np.int32)
    images = rng.integers(0, 256, (n, 1, 4, 4)).astype(np.uint8)
    images[np.arange(n), 0, labels, labels] = 255  # learnable
    return {"image": images, "label": labels}


def _dm(transform):
    return ArrayDataModule(
        train=_pixels(200, 0),
        val=_pixels(50, 1),
        test=_pixels(50, 2),
        predict=_pixels(50, 2),
        batch_size=16,
        transform=transform,
        seed=5,
    )


def _experiment():
    model = eqx.nn.Sequential(
        [eqx.nn.Lambda(jnp.ravel), eqx.nn.MLP(16, 4, 16, 1, key=jax.random.key(0))]
    )
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(1e-2), model), num_classes=4
    )


class _BatchHooks(solstice.callbacks.Callback):
    """Per-batch hooks see the transformed batch: the transform then stays on the host."""

    def __init__(self):
        self.dtypes = set()

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.dtypes.add(batch["image"].dtype)

    def on_validation_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.dtypes.add(batch["image"].dtype)

    def on_predict_batch_end(self, trainer, experiment, outputs, batch, batch_idx):
        self.dtypes.add(batch["image"].dtype)


def _run(transform, callbacks=()):
    trainer = solstice.Trainer(
        max_epochs=2, enable_progress_bar=False, devices=1, callbacks=list(callbacks)
    )
    exp = trainer.fit(_experiment(), _dm(transform))
    tested = trainer.test(exp, _dm(transform))
    predicted = trainer.predict(exp, _dm(transform))
    return trainer, exp, tested, predicted


def _uploaded_dtypes(monkeypatch):
    seen = []
    real = _train_input.Feeder

    def recording(batches, prepare, placement, **kw):
        def spy():
            for item in batches:
                batch = item[1] if kw.get("stacked") else item  # `(n, stacked)` chunks
                seen.append(batch["image"].dtype)
                yield item

        return real(spy(), prepare, placement, **kw)

    monkeypatch.setattr(_train_input, "Feeder", recording)
    return seen


def test_pixels_are_decoded_inside_the_compiled_steps(monkeypatch):
    hooks = _BatchHooks()
    _, host_exp, host_test, host_pred = _run(PixelDecode(), [hooks])
    assert hooks.dtypes == {np.dtype(np.float32)}

    uploaded = _uploaded_dtypes(monkeypatch)
    trainer, exp, tested, predicted = _run(PixelDecode())
    # train, validation, test and predict batches all travelled as uint8
    assert uploaded and set(uploaded) == {np.dtype(np.uint8)}
    for a, b in zip(params_of(host_exp), params_of(exp), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tested == host_test
    np.testing.assert_array_equal(predicted, host_pred)
    assert tested["test/accuracy"] > 0.5


def test_a_numpy_only_transform_is_an_error_naming_the_contract(monkeypatch):
    def numpy_only(batch):  # breaks ArrayDataModule's contract: fails on traced arrays
        return {**batch, "image": np.asarray(batch["image"], np.float32) / 255.0}

    # It used to fall back to decoding on the host silently; the error now propagates, with
    # a note saying what the contract is and how to opt out.
    with pytest.raises(jax.errors.TracerArrayConversionError) as info:
        _run(numpy_only)
    assert "declared traceable" in "\n".join(info.value.__notes__)
    assert BatchLoader(_pixels(8, 1), 4, transform=numpy_only).split_transform() is None


@pytest.mark.parametrize("drop_last", [True, False])
def test_split_transform_yields_the_batches_before_the_transform(drop_last):
    data = _pixels(50, 3)
    decode = PixelDecode()
    loader = BatchLoader(
        data,
        16,
        shuffle=True,
        seed=1,
        drop_last=drop_last,
        transform=decode,
        traceable_transform=True,
    )
    raw, fn = loader.split_transform()
    assert fn is decode and loader.transform is decode  # the original is untouched
    for whole, before in zip(loader, raw, strict=True):
        assert before["image"].dtype == np.uint8
        np.testing.assert_array_equal(decode(before)["image"], whole["image"])
        np.testing.assert_array_equal(before["label"], whole["label"])
    # an undeclared transform is not split off
    plain = BatchLoader(data, 16, transform=decode)
    assert plain.split_transform() is None  # nothing to split: the capability is absent
