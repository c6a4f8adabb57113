"""Resume on another topology: a checkpoint written on 4 devices (replicated or FSDP-sharded)
resumes on 2 or 1 devices, with the same or other sharding rules, at an epoch end and
mid-epoch: the same global batches in the same order (checked exactly, on every data path),
and results allclose to the uninterrupted runs on 4 and on 1 device. The same topology stays
bit-identical. What cannot work is refused before the first step.

Every case is `(before, after, checkpoint)`: Trainer settings of the run that writes the
checkpoints (uninterrupted: it is also the reference) and of the run that resumes. Meshes of
another shape (2x2 with tensor parallelism -> 1x2, -> 1 device) are entries too.

(The 2-process -> 1-process resume is in `test_multiprocess.py`, which reuses the
checkpoints its processes already write.)
"""

import dataclasses
import json
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs, make_mlp_experiment

import solstice
from solstice._in_step import InStep
from solstice._loss_scaling import DynamicScaling
from solstice.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from solstice.datamodules import ArrayDataModule
from solstice.trainer import _precision

# 112 samples in batches of 16: 7 steps per epoch, 14 in all. With `steps_per_execution=2`
# every epoch has a single step (the remainder), at its end or its start.
STEPS = 14
MID_EPOCH = "epoch=1-step=10"  # batch 3 of epoch 1, with the epoch's metric accumulators
EPOCH_END = "epoch=0-step=7"
FSDP = [solstice.FullySharded(min_size=64)]
# Float tolerance of another topology (measured at most 9e-8 absolute, 1.2e-5 relative on
# small values: see docs/scaling.md).
TOL = dict(rtol=2e-5, atol=2e-6)


class DataOrder(Callback):
    """Records a fingerprint of every training batch inside the compiled step (an in-step
    reduction, so no data path is given up for per-batch hooks): entry `s` is
    `sum_i (i + 1) * label_i` of the batch of global step `s + 1`. Integers: exact."""

    def in_step(self) -> InStep:
        return _Fingerprints()


class _Fingerprints(InStep):
    def init(self, experiment):
        return jnp.full((STEPS,), -1, jnp.int32)

    def update(self, carry, data):
        labels = data.batch["label"].astype(jnp.int32)
        weights = jnp.arange(1, labels.shape[0] + 1, dtype=jnp.int32)
        return carry.at[data.step - 1].set(jnp.sum(labels * weights))


def _settings(devices, rules=(), data="host", fused=2, ema=False, mesh=None):
    """Trainer and data settings of one side of a case (`data`: `"host"`, or `"device"`
    for an on-device DataModule, whose batches are gathered inside the step; `ema`: an
    `EMAWeightAveraging`, whose average is an in-step state; `mesh`: `Trainer(mesh=...)`,
    for a mesh of another shape)."""
    return dict(devices=devices, rules=tuple(rules), data=data, fused=fused, ema=ema, mesh=mesh)


def _fit(settings, dirpath=None, ckpt_path=None):
    """One run: `(trainer, experiment, data-order fingerprints)`."""
    order = DataOrder()
    callbacks: list = [order]
    if settings["ema"]:  # the average of the weights: an in-step state
        callbacks.append(EMAWeightAveraging(decay=0.5, use_average_at_end=False))
    if dirpath is not None:
        callbacks.append(
            ModelCheckpoint(dirpath, save_top_k=-1, every_n_train_steps=10, every_n_epochs=1)
        )
    mesh = {} if settings["mesh"] is None else {"mesh": settings["mesh"]}
    trainer = solstice.Trainer(
        **mesh,
        max_epochs=2,
        devices=settings["devices"],
        sharding_rules=settings["rules"],
        steps_per_execution=settings["fused"],
        log_every_n_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    on_device = settings["data"] == "device"
    datamodule = ArrayDataModule(
        train=blobs(112),
        batch_size=16,
        on_device=on_device,
        mesh=trainer.mesh if on_device else None,
    )
    exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), datamodule, ckpt_path)
    return trainer, exp, np.asarray(trainer.in_step_value(order))


# Data paths: fused host batches fed ahead with a single-step remainder (`FOUR`), host
# batches uploaded in chunks (`steps_per_execution=1`), batches gathered inside the step
# from an on-device DataModule (`FSDP_ON_DEVICE`, which also carries an EMA of the weights
# as an in-step state).
FOUR = _settings(4)
FSDP_ON_DEVICE = dict(rules=FSDP, data="device", fused=1, ema=True)
ONE = _settings(1, fused=1)
# A 2-D mesh: tensor parallel over "model", FSDP over "data" (the MLP's first weight is split
# over both axes), and a mesh of another shape with the model axis alone.
TP_FSDP = [
    solstice.Combined(solstice.TensorParallel(), solstice.FullySharded(axis="data", min_size=64))
]
MESH_2X2 = _settings(4, rules=TP_FSDP, mesh={"data": 2, "model": 2})

# (before, after, checkpoint). The `after` settings repeat a few (compiling costs the most).
CASES = {
    "4->2 mid-epoch": (FOUR, _settings(2), MID_EPOCH),
    "4->1 epoch end, unfused": (FOUR, ONE, EPOCH_END),
    "4 fsdp->2 fsdp mid-epoch": (
        _settings(4, **FSDP_ON_DEVICE),
        _settings(2, **FSDP_ON_DEVICE),
        MID_EPOCH,
    ),
    # from on-device data to host data, without the EMA (its in-step state goes unused; the
    # data order's is still restored)
    "4 fsdp->1 plain epoch end": (_settings(4, **FSDP_ON_DEVICE), ONE, EPOCH_END),
    # (the EMA starts afresh: the checkpoint has none)
    "4 plain->2 fsdp mid-epoch, unfused": (FOUR, _settings(2, **FSDP_ON_DEVICE), MID_EPOCH),
    "2x2 tp+fsdp->1x2 tp mid-epoch": (
        MESH_2X2,
        _settings(2, rules=[solstice.TensorParallel()], mesh={"data": 1, "model": 2}),
        MID_EPOCH,
    ),
    "2x2 tp+fsdp->1 epoch end": (MESH_2X2, ONE, EPOCH_END),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each `before` run, once: straight through, checkpointing as it goes."""
    runs = {}

    def get(settings):
        key = repr(sorted(settings.items()))
        if key not in runs:
            dirpath = tmp_path_factory.mktemp("ckpt")
            runs[key] = (*_fit(settings, dirpath), dirpath)
        return runs[key]

    return get


def _arrays(exp):
    out = []
    for x in jax.tree.leaves(eqx.filter(exp, eqx.is_array)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def _assert_allclose(expected, got):
    for a, b in zip(_arrays(expected), _arrays(got), strict=True):
        np.testing.assert_allclose(b, a, **TOL)


def _exact(exp):
    """The arrays that no float reduction touches (PRNG keys, step counts), with their
    shardings."""
    out = []
    for x in jax.tree.leaves(eqx.filter(exp, eqx.is_array)):
        if not eqx.is_inexact_array(x):
            data = (
                jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            )
            out.append((x.sharding, np.asarray(data)))
    return out


def _ema(trainer):
    (ema,) = [cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging)]
    return trainer.in_step_value(ema)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_on_another_topology(case, uninterrupted):
    before, after, name = CASES[case]
    ref_trainer, expected, expected_order, dirpath = uninterrupted(before)
    with pytest.warns(RuntimeWarning, match="on another topology") as caught:
        trainer, got, order = _fit(after, ckpt_path=dirpath / name)
    text = " ".join(str(w.message) for w in caught)
    assert "same global batches in the same order" in text and "not bit-identical" in text
    assert "other settings" not in text  # nothing that holds is reported as a difference
    if after["rules"] != before["rules"]:
        assert "`sharding` " in text
    # the same global batches, in the same order, on every data path
    np.testing.assert_array_equal(order, expected_order)
    assert trainer.global_step == ref_trainer.global_step == STEPS
    _assert_allclose(expected, got)
    _assert_allclose(uninterrupted(ONE)[1], got)  # and the run on one device
    # PRNG keys and counts: never split, never per device; the same bits as the uninterrupted run's
    exact = _exact(got)
    assert any(v.dtype == np.uint32 for _, v in exact)  # the experiment's key is among them
    for (_, a), (sharding, b) in zip(_exact(expected), exact, strict=True):
        assert sharding.is_fully_replicated and len(sharding.device_set) == after["devices"]
        np.testing.assert_array_equal(b, a)
    if before["ema"] and after["ema"]:  # the average of the weights (in-step) carries over
        averages = [_ema(t) for t in (ref_trainer, trainer)]
        _assert_allclose(*averages)
        devices = {len(x.sharding.device_set) for x in jax.tree.leaves(averages[1])}
        assert devices == {after["devices"]}
    np.testing.assert_allclose(
        trainer.callback_metrics["train/loss_epoch"],
        ref_trainer.callback_metrics["train/loss_epoch"],
        **TOL,
    )


def test_the_run_on_four_devices_is_the_run_on_one(uninterrupted):
    """The references agree: 4 devices and 1 device, the same batches, allclose; and the
    checkpoints they write record the same position and DataModule state."""
    four, exp4, order4, dir4 = uninterrupted(FOUR)
    one, exp1, order1, dir1 = uninterrupted(ONE)
    np.testing.assert_array_equal(order1, order4)
    _assert_allclose(exp1, exp4)
    for name in (MID_EPOCH, EPOCH_END):
        docs = [json.loads((d / name / "solstice.json").read_text()) for d in (dir4, dir1)]
        assert docs[0]["datamodule"] == docs[1]["datamodule"], name
        assert docs[0]["progress"] == docs[1]["progress"], name
        assert (docs[0]["trainer"]["devices"], docs[1]["trainer"]["devices"]) == (4, 1)


def test_the_same_topology_resumes_bit_for_bit(uninterrupted):
    trainer, expected, expected_order, dirpath = uninterrupted(FOUR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing differs, nothing to say
        resumed, got, order = _fit(FOUR, ckpt_path=dirpath / MID_EPOCH)
    np.testing.assert_array_equal(order, expected_order)
    for a, b in zip(_arrays(expected), _arrays(got), strict=True):
        np.testing.assert_array_equal(b, a)
    assert resumed.callback_metrics == trainer.callback_metrics


def test_a_batch_that_does_not_split_over_the_new_devices_is_refused(uninterrupted):
    *_, dirpath = uninterrupted(FOUR)
    with pytest.raises(
        ValueError,
        match=r"global batch size of 16, which does not split evenly "
        r"over this Trainer's 3 devices.*`devices=2`",
    ):
        _fit(_settings(3), ckpt_path=dirpath / MID_EPOCH)


def test_arrays_of_other_shapes_are_named(uninterrupted):
    *_, dirpath = uninterrupted(FOUR)
    trainer = solstice.Trainer(devices=2, max_epochs=2, enable_progress_bar=False)
    other = make_mlp_experiment(in_size=8, num_classes=4, width=16)
    with pytest.raises(
        ValueError,
        match=r"(?s)shape or dtype mismatch.*checkpoint float32\[32, 8\], "
        r"template float32\[16, 8\]",
    ):
        trainer.fit(other, ArrayDataModule(train=blobs(112), batch_size=16), dirpath / MID_EPOCH)


def test_the_dynamic_loss_scale_carries_over_to_another_topology(tmp_path, monkeypatch):
    """`16-mixed`'s loss scale (an in-step state, with its count of finite steps) comes back
    on 2 devices from a checkpoint written on 4, exactly; the parameters end allclose (float16
    arithmetic summed in another order). The scale starts at 16 and doubles every 3 finite steps here, so a
    scale or a count that restarted at the resume would end lower."""
    policy = dataclasses.replace(
        _precision.POLICIES["16-mixed"], scaling=DynamicScaling(initial=16.0, growth_interval=3)
    )
    monkeypatch.setitem(_precision.POLICIES, "16-mixed", policy)

    def fit(devices, ckpt_path=None):
        trainer = solstice.Trainer(
            max_epochs=2,
            devices=devices,
            precision="16-mixed",
            log_every_n_steps=7,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1, every_n_train_steps=10)],
        )
        datamodule = ArrayDataModule(train=blobs(112), batch_size=16)
        experiment = make_mlp_experiment(in_size=8, num_classes=4)
        return trainer, trainer.fit(experiment, datamodule, ckpt_path)

    reference, expected = fit(4)
    checkpoint = json.loads((tmp_path / MID_EPOCH / "solstice.json").read_text())
    assert checkpoint["progress"]["global_step"] == 10
    with pytest.warns(RuntimeWarning, match="on another topology"):
        resumed, got = fit(2, ckpt_path=tmp_path / MID_EPOCH)
    assert reference.loss_scale == 16.0 * 2**4  # doubled after steps 3, 6, 9 and 12
    assert resumed.loss_scale == reference.loss_scale
    for a, b in zip(_arrays(expected), _arrays(got), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_a_mid_epoch_batch_must_split_over_the_data_axis_not_every_device():
    from solstice.trainer._placement import Placement
    from solstice.trainer._resume import check_batch_split

    mesh = Placement(mesh={"data": 2, "model": 2})  # 4 devices, batches split 2 ways
    check_batch_split({"train_batch_size": 6}, mesh, "ckpt")  # 3 rows per data slice
    with pytest.raises(ValueError, match=r"6, which does not split evenly over this Trainer's 4"):
        check_batch_split({"train_batch_size": 6}, Placement(devices=4), "ckpt")
    with pytest.raises(ValueError, match=r"2 slices of its data axis 'data'.*`devices=1`"):
        check_batch_split({"train_batch_size": 5}, mesh, "ckpt")
