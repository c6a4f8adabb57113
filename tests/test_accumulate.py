"""`Trainer(accumulate_grad_batches=K)`: K microbatches scanned inside one compiled optimizer
step give the parameters of the same run with K-times-larger batches, and every step count
(global_step, max_steps, schedules, logs, checkpoints) counts optimizer steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import NoOptimizer, Regression, params_of, regression_split

import solstice
from solstice.callbacks import Callback, ModelCheckpoint
from solstice.datamodules import ArrayDataModule


def _experiment(optimizer="sgd", lr=0.1):
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    if isinstance(optimizer, str):
        transformation = {"sgd": optax.sgd(lr), "adam": optax.adam(lr)}[optimizer]
    else:
        transformation = optimizer
    return Regression(model, solstice.OptaxOptimizer(transformation, model), "tuple")


def _datamodule(n, batch_size, seed=0):
    x, y = regression_split(n, seed)
    return ArrayDataModule(train=(x, y), batch_size=batch_size, seed=seed)


def _fit(batch_size, accumulate, *, n=128, experiment=None, callbacks=(), **kw):
    kw.setdefault("max_epochs", 2)
    kw.setdefault("devices", 1)
    kw.setdefault("log_every_n_steps", kw.get("steps_per_execution", 1))
    trainer = solstice.Trainer(
        accumulate_grad_batches=accumulate,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **kw,
    )
    trained = trainer.fit(experiment or _experiment(), _datamodule(n, batch_size))
    return trainer, trained


def _assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("optimizer", "fused"), [("sgd", 1), ("adam", 2)])
def test_microbatches_give_the_parameters_of_a_k_times_larger_batch(optimizer, fused):
    # 128 samples: 2 steps of 64 per epoch (the order of the samples is the same: the
    # ArrayDataModule's shuffle permutes samples, fixed by (seed, epoch)).
    big_t, big = _fit(64, 1, experiment=_experiment(optimizer), max_epochs=3, log_every_n_steps=2)
    micro_t, micro = _fit(
        16,
        4,
        experiment=_experiment(optimizer),
        max_epochs=3,
        steps_per_execution=fused,
        log_every_n_steps=2,
    )
    assert micro_t.global_step == big_t.global_step == 6
    assert micro_t.progress.batch_idx == 0 and micro_t.current_epoch == 3
    _assert_same_params(big, micro)
    assert not np.allclose(params_of(big)[0], params_of(_experiment(optimizer))[0])
    # The optimizer was applied once per optimizer step: adam's count says so.
    if optimizer == "adam":
        count = jax.tree.leaves(micro.optimizer.opt_state)[0]
        assert int(count) == 6
    # The logged loss of a step is the mean over its microbatches: the big batch's.
    big_t.flush_logs()
    micro_t.flush_logs()
    for name in ("train/mse", "train/mse_epoch"):
        np.testing.assert_allclose(
            big_t.history.metrics[name], micro_t.history.metrics[name], rtol=1e-5
        )
    assert micro_t.history.steps["train/mse"] == big_t.history.steps["train/mse"]


def test_step_counts_are_optimizer_steps(tmp_path):
    seen = []

    class Positions(Callback):
        def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
            seen.append((batch_idx, trainer.global_step, jax.tree.leaves(batch)[0].shape[0]))

    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=5)
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=2, every_n_epochs=None, save_top_k=-1)
    trainer, trained = _fit(
        8,
        4,
        n=128,  # 16 batches of 8: 4 optimizer steps an epoch
        experiment=_experiment(optax.sgd(schedule)),
        max_epochs=None,
        max_steps=5,
        log_every_n_steps=2,
        callbacks=[Positions(), ckpt],
    )
    assert trainer.global_step == 5
    # on_train_batch_end per loader batch; the global step moves at each 4th.
    assert [s[0] for s in seen] == list(range(16)) + list(range(4))
    assert [s[1] for s in seen] == [i // 4 for i in range(1, 21)]
    assert {s[2] for s in seen} == {8}
    # The schedule advanced once per optimizer step: the same run with batches of 32.
    _, big = _fit(
        32, 1, n=128, experiment=_experiment(optax.sgd(schedule)), max_epochs=None, max_steps=5
    )
    _assert_same_params(big, trained)
    trainer.flush_logs()
    assert trainer.history.steps["train/mse"] == [2, 4, 5]  # (4: the epoch end; 5: the last)
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("epoch="))
    assert saved == ["epoch=0-step=2", "epoch=0-step=4"]  # every 2 optimizer steps


def test_an_epoch_ends_with_a_partial_step_over_the_batches_left():
    # 112 samples, batches of 16: 7 batches, K=4 -> a step of 4 batches and one of 3.
    n, lr = 112, 0.1
    trainer, trained = _fit(16, 4, n=n, max_epochs=1)
    assert trainer.global_step == 2 and trainer.progress.batch_idx == 0
    x, y = regression_split(n, 0)
    order = _epoch_order(n)
    model = _experiment().model

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)

    for rows in (order[:64], order[64:112]):  # the mean over the samples each step saw
        grads = eqx.filter_grad(loss)(model, x[rows], y[rows])
        model = eqx.apply_updates(model, jax.tree.map(lambda g: -lr * g, grads))
    _assert_same_params(trained, Regression(model, None, "tuple"))


def _epoch_order(n):
    """The samples of epoch 0, in order, read back from the DataModule's batches."""
    x, _ = regression_split(n, 0)
    dm = _datamodule(n, 16)
    dm.setup("fit")
    dm.set_epoch(0)
    rows = [np.asarray(b[0]) for b in dm.train_dataloader()]
    index = {tuple(r): i for i, r in enumerate(x)}
    return np.array([index[tuple(r)] for batch in rows for r in batch])


def test_fused_steps_with_partial_steps_and_a_lead_match_single_steps():
    # 7 batches an epoch, K=2, S=2: steps of 2,2,2 and a partial step of 1 batch; the next
    # epoch starts off the fused grid (a lead step).
    single_t, single = _fit(16, 2, n=112, max_epochs=3)
    fused_t, fused = _fit(16, 2, n=112, max_epochs=3, steps_per_execution=2)
    assert single_t.global_step == fused_t.global_step == 12
    _assert_same_params(single, fused, rtol=1e-6, atol=1e-7)


def test_microbatches_on_four_devices_match_one_device():
    one_t, one = _fit(16, 4, devices=1, steps_per_execution=2)
    four_t, four = _fit(16, 4, devices=4, steps_per_execution=2)
    big_t, big = _fit(64, 1, devices=4)
    assert len(four_t.devices) == 4
    assert one_t.global_step == four_t.global_step == big_t.global_step == 4
    _assert_same_params(one, four)
    _assert_same_params(big, four)


@pytest.mark.parametrize(("interrupt_at", "on_device"), [(1, False), (4, False), (3, True)])
def test_an_interrupted_microbatched_run_resumes_bit_identically(interrupt_at, on_device):
    # 7 batches of 16 an epoch with K=2: 4 steps, the last partial; steps 1 and 3 are
    # mid-epoch, step 4 the end of epoch 0. On the device: 4 devices, microbatches gathered.
    x, y = regression_split(112, 0)
    report = solstice.check_resume(
        lambda: _experiment("adam", 0.05),
        lambda: ArrayDataModule(train=(x, y), batch_size=16, seed=0, on_device=on_device),
        dict(
            max_epochs=2,
            accumulate_grad_batches=2,
            log_every_n_steps=1,
            devices="auto" if on_device else 1,
            num_sanity_val_steps=0,
        ),
        interrupt_at=interrupt_at,
    )
    assert report, report


def test_a_resume_with_another_k_refuses_mid_epoch_and_warns_between_epochs(tmp_path):
    def run(accumulate, max_steps, ckpt_path=None, every_epoch=False):
        ckpt = ModelCheckpoint(
            tmp_path / str(every_epoch),
            every_n_train_steps=None if every_epoch else 1,
            every_n_epochs=1 if every_epoch else None,
        )
        trainer = solstice.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=accumulate,
            devices=1,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            callbacks=[ckpt],
        )
        trainer.fit(_experiment(), _datamodule(128, 16), ckpt_path=ckpt_path)
        return ckpt.last_model_path

    mid = run(2, 1)  # 8 batches an epoch: step 1 is mid-epoch
    with pytest.raises(
        ValueError, match="mid-epoch with `accumulate_grad_batches=2`; this run has 4"
    ):
        run(4, 3, mid)
    end = run(2, 4, mid, every_epoch=True)  # saved at the end of epoch 0
    with pytest.warns(RuntimeWarning, match="`accumulate_grad_batches` 2 in the checkpoint, 4 now"):
        run(4, 5, end)


def test_an_experiment_without_a_solstice_optimizer_is_told_the_multisteps_recipe():
    with pytest.raises(ValueError, match="holds none.*optax.MultiSteps"):
        _fit(16, 4, experiment=NoOptimizer(jnp.zeros(3)))


def test_accumulate_grad_batches_is_checked():
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        solstice.Trainer(max_epochs=1, accumulate_grad_batches=0)
    assert (
        solstice.Trainer(max_epochs=1, accumulate_grad_batches=3).hparams["accumulate_grad_batches"]
        == 3
    )


class LastCall(solstice.InStep):
    uses_optimizer_calls = True

    def init(self, experiment):
        return {"grad": jnp.zeros((), jnp.float32), "update": jnp.zeros((), jnp.float32)}

    def update(self, carry, data):
        (call,) = data.optimizer_calls
        return {"grad": optax.tree.norm(call.grads), "update": optax.tree.norm(call.updates)}


class Watch(Callback):
    def __init__(self):
        self.reduction = LastCall()

    def in_step(self):
        return self.reduction


def test_in_step_reductions_see_the_step_s_averaged_gradients_and_applied_updates():
    watches = Watch(), Watch()
    big_t, _ = _fit(64, 1, max_epochs=None, max_steps=1, callbacks=[watches[0]])
    micro_t, _ = _fit(16, 4, max_epochs=None, max_steps=1, callbacks=[watches[1]])
    big = jax.device_get(big_t.in_step_value(watches[0]))
    micro = jax.device_get(micro_t.in_step_value(watches[1]))
    assert big["grad"] > 0
    np.testing.assert_allclose(micro["grad"], big["grad"], rtol=1e-5)
    np.testing.assert_allclose(micro["update"], 0.1 * big["grad"], rtol=1e-5)


def test_detect_anomaly_names_the_optimizer_step_whose_microbatch_is_not_finite():
    x, y = regression_split(128, 0)
    x[40, 1] = np.nan  # batch 2 of 16 (no shuffling): the first microbatch of step 2
    dm = ArrayDataModule(train=(x, y), batch_size=16, shuffle=False)
    trainer = solstice.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        detect_anomaly=True,
        devices=1,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(FloatingPointError, match=r"input of training step 2 .*`batch\[0\]`"):
        trainer.fit(_experiment(), dm)


def test_a_device_resident_datamodule_and_per_batch_hooks_with_fused_steps():
    ends = []

    class Ends(Callback):
        def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
            ends.append((batch_idx, trainer.global_step))

    x, y = regression_split(128, 0)
    trainer = solstice.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        steps_per_execution=2,
        log_every_n_steps=2,
        devices=1,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[Ends()],
    )
    dm = ArrayDataModule(train=(x, y), batch_size=16, seed=0, on_device=True, mesh=trainer.mesh)
    on_device = trainer.fit(_experiment(), dm)
    assert ends == [(i, (i + 1) // 2) for i in range(8)]
    _, host = _fit(16, 2, max_epochs=1, steps_per_execution=2)
    _assert_same_params(host, on_device, rtol=1e-6, atol=1e-7)


def test_bfloat16_gradients_are_summed_in_float32():
    def bf16_experiment():
        model = eqx.nn.Linear(3, 1, key=jax.random.key(0), dtype=jnp.bfloat16)
        return Regression(model, solstice.OptaxOptimizer(optax.sgd(0.1), model), "tuple")

    _, big = _fit(64, 1, experiment=bf16_experiment(), max_epochs=1)
    _, micro = _fit(16, 4, experiment=bf16_experiment(), max_epochs=1)
    assert params_of(micro)[0].dtype == jnp.bfloat16
    for a, b in zip(params_of(big), params_of(micro)):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=1e-2
        )


def test_a_microbatched_step_needs_the_memory_of_one_microbatch_and_the_gradient_sum():
    # XLA's own accounting of the compiled steps' temporary buffers (activations,
    # gradients): K=4 microbatches of B need those of one batch of B plus one gradient sum,
    # far less than one batch of 4B.
    from solstice.trainer._compile import CompiledSteps
    from solstice.trainer._trace_log import TraceLog

    model = eqx.nn.MLP(64, 4, 256, 2, key=jax.random.key(0))
    experiment = solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.sgd(0.1), model), num_classes=4
    )
    dyn = eqx.filter(experiment, eqx.is_array)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))

    def temp_bytes(rows, microbatches):
        steps = CompiledSteps(
            experiment, jax.sharding.SingleDeviceSharding(jax.devices()[0]), TraceLog()
        )
        one = {"image": jnp.zeros((rows, 64)), "label": jnp.zeros((rows,), jnp.int32)}
        acc = steps.empty_accumulator("train", dyn, one)
        defs = (jax.tree.structure(dyn), jax.tree.structure(acc), jax.tree.structure(None))
        if microbatches == 1:
            fn, batch = steps.train(defs), one
        else:
            fn = steps.train_accumulated(
                defs, n=1, m=microbatches, accumulate=microbatches, closing=False
            )
            batch = jax.tree.map(lambda x: jnp.stack([x] * microbatches), one)
        args = (
            jax.tree.leaves(dyn),
            jax.tree.leaves(acc),
            batch,
            jnp.bool_(True),
            None,
            jnp.int32(0),
            None,
            None,
        )
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    micro, small, big = temp_bytes(256, 4), temp_bytes(256, 1), temp_bytes(1024, 1)
    assert micro <= small + 1.25 * param_bytes, (micro, small, param_bytes)
    assert big - small > 2 * param_bytes  # (the activations of 3 more batches of 256)
    assert micro < big - param_bytes, (micro, big)


@pytest.mark.parametrize("fused", [1, 2])
def test_a_device_resident_datamodule_gathers_each_microbatch_inside_the_step(fused, monkeypatch):
    from solstice.datamodules._device import DeviceBatchLoader

    x, y = regression_split(112, 0)  # 7 batches of 16: steps of 2, 2, 2 and 1 batch

    def fit(on_device):
        trainer = solstice.Trainer(
            max_epochs=2,
            accumulate_grad_batches=2,
            steps_per_execution=fused,
            log_every_n_steps=2,
            devices=1,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
        )
        mesh = trainer.mesh if on_device else None
        dm = ArrayDataModule(train=(x, y), batch_size=16, seed=0, on_device=on_device, mesh=mesh)
        return trainer, trainer.fit(_experiment(), dm)

    host_t, host = fit(False)

    def not_gathered(*args):
        raise AssertionError("the device-resident batches were read one by one")

    monkeypatch.setattr(DeviceBatchLoader, "_batches", not_gathered)
    device_t, device = fit(True)
    assert device_t.global_step == host_t.global_step == 8
    _assert_same_params(host, device, rtol=1e-6, atol=1e-7)
    host_t.flush_logs()
    device_t.flush_logs()
    assert device_t.history.metrics["train/mse"] == pytest.approx(
        host_t.history.metrics["train/mse"], rel=1e-6
    )


def _write_key(batch, step):
    """A device transform that writes its key into every sample's first input."""
    x, y = batch
    return x.at[:, 0].set(jnp.asarray(step, x.dtype)), y


class KeyedData(ArrayDataModule):
    @property
    def device_transform(self):
        return _write_key


class Keys(solstice.InStep):
    def init(self, experiment):
        return jnp.zeros((2,), jnp.float32)

    def update(self, carry, data):
        return data.batch[0][:, 0, 0]  # the key of each microbatch of the step


class KeyWatch(Callback):
    def __init__(self):
        self.reduction = Keys()

    def in_step(self):
        return self.reduction


def test_each_microbatch_has_its_own_transform_key_and_in_steps_see_them_all():
    x, y = regression_split(128, 0)
    watch = KeyWatch()
    trainer = solstice.Trainer(
        max_steps=3,
        accumulate_grad_batches=2,
        devices=1,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[watch],
    )
    trainer.fit(_experiment(), KeyedData(train=(x, y), batch_size=16, seed=0))
    # The third optimizer step (after global step 2): microbatches keyed 2*2+0 and 2*2+1.
    np.testing.assert_array_equal(jax.device_get(trainer.in_step_value(watch)), [4.0, 5.0])
