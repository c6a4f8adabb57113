"""Precision policies (`Trainer(precision=...)`): the compiled step computes in bf16/f16 on
float32 masters, checkpoints keep the masters, digits trains as well as in float32, bf16-true
casts everything, 16-mixed skips overflowing steps and adapts its loss scale, resumes are
exact."""

import dataclasses
import functools
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SquaredError, blobs_datamodule, make_mlp_experiment, regression

import solstice
from solstice._loss_scaling import DynamicScaling
from solstice.callbacks import ModelCheckpoint
from solstice.datamodules import ArrayDataModule, Digits
from solstice.trainer import _precision


def _trainer(precision, **kw):
    kw = {"enable_progress_bar": False, "devices": 1, "num_sanity_val_steps": 0, **kw}
    return solstice.Trainer(precision=precision, **kw)


def _floating_dtypes(tree):
    return {str(x.dtype) for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)}


def _growth_every(monkeypatch, steps):
    """16-mixed with a loss scale that doubles after `steps` finite steps (2000 by default)."""
    policy = dataclasses.replace(
        _precision.POLICIES["16-mixed"], scaling=DynamicScaling(growth_interval=steps)
    )
    monkeypatch.setitem(_precision.POLICIES, "16-mixed", policy)


def test_an_unknown_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'32-true', 'bf16-mixed', '16-mixed', 'bf16-true'"):
        solstice.Trainer(precision="bf16")
    with pytest.raises(ValueError, match="Did you mean `precision='bf16-mixed'`"):
        solstice.Trainer(precision="bf16")


# ------------------------------------------------------------------ the compiled step
def _train_step_ir(tmp_path: Path, precision: str) -> str:
    """The StableHLO of the compiled training step of a one-epoch fit."""
    jax.config.update("jax_dump_ir_to", str(tmp_path))
    try:
        _trainer(precision, max_steps=2, limit_val_batches=0, compilation_cache=False).fit(
            make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule(n_train=64)
        )
    finally:
        jax.config.update("jax_dump_ir_to", "")
    (path,) = tmp_path.glob("*jit_train_step_compile.mlir")
    return path.read_text()


@pytest.mark.parametrize(("precision", "dot"), [("32-true", "f32"), ("bf16-mixed", "bf16")])
def test_the_compiled_step_multiplies_in_bf16_on_float32_parameters(tmp_path, precision, dot):
    ir = _train_step_ir(tmp_path, precision)
    main = re.search(r"func\.func public @main\((.*?)\) -> \((.*?)\) \{", ir, re.S)
    assert main is not None
    signature = main.group(1) + main.group(2)
    weights = re.findall(r"tensor<32x8x(\w+)>", signature)  # first layer: weight, moments
    assert len(weights) == 6 and set(weights) == {"f32"}  # in (donated) and out
    assert "bf16" not in signature  # the step's inputs and outputs stay float32
    dots = re.findall(r"stablehlo\.dot_general.*?-> tensor<[0-9x]*x(\w+)>", ir)
    assert dots and set(dots) == {dot}, dots


def test_bf16_mixed_checkpoints_hold_float32_masters(tmp_path):
    ckpt = ModelCheckpoint(tmp_path)
    trainer = _trainer("bf16-mixed", max_epochs=1, callbacks=[ckpt])
    trained = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert _floating_dtypes(trained) == {"float32"}
    loaded = solstice.load(ckpt.last_model_path, like=make_mlp_experiment(in_size=8, num_classes=4))
    assert _floating_dtypes(loaded) == {"float32"}
    for a, b in zip(
        jax.tree.leaves(eqx.filter(trained, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(loaded, eqx.is_inexact_array)),
    ):
        np.testing.assert_array_equal(a, b)
    # the masters moved by float32 updates: not values a bfloat16 array can hold
    weight = np.asarray(trained.model.layers[1].layers[0].weight)
    assert not np.array_equal(weight, weight.astype(jnp.bfloat16).astype(np.float32))


def test_small_updates_are_not_lost_in_bf16():
    # Plain SGD has no float32 state: its updates are float32 only because the policy
    # hands the optimizer float32 gradients, and the masters keep them.
    x = np.ones((8, 3), np.float32)
    y = np.full((8,), 2.0, np.float32)
    start = regression(lr=1e-4)
    start = eqx.tree_at(lambda e: e.model.weight, start, jnp.full((1, 3), 1.0))
    start = eqx.tree_at(lambda e: e.model.bias, start, jnp.zeros((1,)))
    dm = ArrayDataModule(train=(x, y), batch_size=8, shuffle=False)
    trained = _trainer("bf16-mixed", max_steps=1).fit(start, dm)
    # error 1 at weights 1: grad of mean((w.x + b - y)^2) is 2 per weight, update -2e-4
    np.testing.assert_allclose(trained.model.weight, np.full((1, 3), 1.0 - 2e-4), rtol=1e-6)


@functools.cache
def _digits_accuracy(precision):
    trainer = _trainer(precision, max_epochs=3, limit_val_batches=0)
    trainer.fit(make_mlp_experiment(width=64), Digits(batch_size=32))
    return trainer.test()["test/accuracy"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_digits_trains_to_the_accuracy_of_float32(precision):
    reference = _digits_accuracy("32-true")
    got = _digits_accuracy(precision)
    assert reference > 0.85
    assert abs(got - reference) < 0.03, (got, reference)


def test_evaluation_computes_in_bf16_and_returns_float32():
    dm = blobs_datamodule()
    trainer = _trainer("bf16-mixed", max_epochs=1)
    trained = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), dm)
    probabilities = trainer.predict(trained, dm)
    assert probabilities.dtype == np.float32
    # computed from bfloat16 weights: close to, not equal to, the float32 model's output
    x = jnp.asarray(dm.splits["predict"]["image"])
    exact = trained.predict_step({"image": x})
    assert not np.array_equal(probabilities, exact)
    np.testing.assert_allclose(probabilities, exact, atol=0.03)
    metrics = trainer.validate(trained, dm)
    assert 0.0 <= metrics["val/accuracy"] <= 1.0


def test_bf16_true_casts_the_whole_experiment_once(tmp_path):
    ckpt = ModelCheckpoint(tmp_path)
    trainer = _trainer("bf16-true", max_epochs=2, callbacks=[ckpt])
    trained = trainer.fit(
        make_mlp_experiment(in_size=8, num_classes=4, lr=1e-2), blobs_datamodule()
    )
    assert _floating_dtypes(trained.model) == {"bfloat16"}
    assert _floating_dtypes(trained.optimizer.opt_state) == {"bfloat16"}  # adam's moments
    assert trainer.callback_metrics["val/accuracy"] > 0.8  # it learns
    like = _precision.POLICIES["bf16-true"].start(make_mlp_experiment(in_size=8, num_classes=4))
    loaded = solstice.load(ckpt.last_model_path, like=like)  # the checkpoint holds bf16
    assert _floating_dtypes(loaded) == {"bfloat16"}


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32-true", "float32"), ("bf16-mixed", "float32"), ("bf16-true", "bfloat16")],
)
def test_predictions_come_back_in_the_policys_output_dtype(precision, dtype):
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    dm = ArrayDataModule(predict=(x, x[:, 0]), batch_size=8)
    out = _trainer(precision).predict(regression(), dm)  # `predict_step` as returned
    assert {str(v.dtype) for v in out.values()} == {dtype}


# ------------------------------------------------------------------ 16-mixed
class Scaled(solstice.Experiment):
    """A linear regression whose train_step scales its loss (or not)."""

    model: eqx.nn.Linear
    optimizer: solstice.Optimizer
    scales: bool = eqx.field(static=True, default=True)

    def train_step(self, batch):
        x, y = batch

        def loss(model):  # in float32: its gradient enters float16 at the outputs
            value = jnp.mean((jax.vmap(model)(x)[:, 0].astype(jnp.float32) - y) ** 2)
            return solstice.scale_loss(value) if self.scales else value

        grads = eqx.filter_grad(loss)(self.model)
        updates, optimizer = self.optimizer(grads, eqx.filter(self.model, eqx.is_array))
        new = eqx.tree_at(
            lambda e: (e.model, e.optimizer),
            self,
            (eqx.apply_updates(self.model, updates), optimizer),
        )
        return new, SquaredError(jax.vmap(self.model)(x)[:, 0] - y)

    def eval_step(self, batch):
        x, y = batch
        return SquaredError(jax.vmap(self.model)(x)[:, 0] - y)


def _scaled(scales=True):
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    return Scaled(model, solstice.SGDOptimizer(model, 0.05), scales)


def _small():
    """Zero weights, for data scaled by 0.01: gradients small enough for a scale of 2**17."""
    return jax.tree.map(jnp.zeros_like, _scaled())


def _batches(*scales):
    """One batch of 4 rows per entry of `scales`, its inputs multiplied by it."""
    rng = np.random.default_rng(0)
    x = np.concatenate([s * rng.normal(size=(4, 3)) for s in scales]).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    return ArrayDataModule(train=(x, y), batch_size=4, shuffle=False)


def _weights(experiment):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(experiment.model)])


@pytest.mark.parametrize("fused", [1, 2])
def test_16_mixed_unscales_the_gradients(fused):
    dm = _batches(0.1, 0.1)
    exact = _trainer("32-true", max_steps=2).fit(_scaled(), dm)
    trainer = _trainer("16-mixed", max_steps=2, steps_per_execution=fused, log_every_n_steps=2)
    mixed = trainer.fit(_scaled(), dm)
    np.testing.assert_allclose(_weights(mixed), _weights(exact), rtol=3e-3, atol=1e-3)
    assert trainer.loss_scale == 2.0**15
    assert _floating_dtypes(mixed) == {"float32"}


def test_16_mixed_skips_an_overflowing_step_and_halves_the_scale():
    dm = _batches(0.1, 300, 0.1)  # the second batch's scaled loss overflows float16
    after_one = _trainer("16-mixed", max_steps=1).fit(_scaled(), dm)
    trainer = _trainer("16-mixed", max_steps=2)
    after_two = trainer.fit(_scaled(), dm)
    np.testing.assert_array_equal(_weights(after_two), _weights(after_one))  # skipped
    np.testing.assert_array_equal(after_two.optimizer.count, after_one.optimizer.count)
    assert trainer.loss_scale == 2.0**14
    trainer = _trainer("16-mixed", max_steps=3)
    after_three = trainer.fit(_scaled(), dm)
    assert np.all(np.isfinite(_weights(after_three)))
    assert not np.array_equal(_weights(after_three), _weights(after_one))  # trains on
    assert trainer.loss_scale == 2.0**14


def test_16_mixed_grows_the_scale_after_a_run_of_finite_steps(monkeypatch):
    _growth_every(monkeypatch, 2)
    for steps, scale in [(1, 2.0**15), (2, 2.0**16), (3, 2.0**16), (4, 2.0**17)]:
        trainer = _trainer("16-mixed", max_steps=steps)
        trainer.fit(_small(), _batches(0.01, 0.01, 0.01, 0.01))
        assert trainer.loss_scale == scale, steps


def test_16_mixed_needs_scale_loss():
    with pytest.raises(ValueError, match=r"never called `solstice.scale_loss`"):
        _trainer("16-mixed", max_steps=1).fit(_scaled(scales=False), _batches(1))
    assert jnp.asarray(3.0) == solstice.scale_loss(3.0)  # outside a 16-mixed step: as is


def test_16_mixed_in_step_reductions_see_unscaled_float32_gradients():
    class GradNorm(solstice.InStep):
        uses_optimizer_calls = True

        def init(self, experiment=None):  # (main's InStep.init takes the experiment)
            return jnp.zeros((), jnp.float32)

        def update(self, carry, data):
            (call,) = data.optimizer_calls
            assert {x.dtype for x in jax.tree.leaves(call.grads)} == {jnp.dtype(jnp.float32)}
            return optax.tree.norm(call.grads)

    class Watch(solstice.callbacks.Callback):
        def in_step(self):
            return GradNorm()

    norms = {}
    for precision in ("32-true", "16-mixed"):
        watch = Watch()
        trainer = _trainer(precision, max_steps=1, callbacks=[watch])
        trainer.fit(_scaled(), _batches(0.1))
        norms[precision] = float(trainer.in_step_value(watch))
    assert norms["16-mixed"] == pytest.approx(norms["32-true"], rel=3e-3)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true"])
def test_a_run_with_a_policy_resumes_bit_for_bit(precision):
    def kwargs():
        return dict(
            max_epochs=1,
            log_every_n_steps=3,
            devices=1,
            enable_progress_bar=False,
            precision=precision,
        )

    def make():
        return make_mlp_experiment(in_size=8, num_classes=4)

    report = solstice.check_resume(make, blobs_datamodule, kwargs, interrupt_at=5)
    assert report, str(report)


def test_the_loss_scale_resumes_with_the_run(tmp_path, monkeypatch):
    _growth_every(monkeypatch, 3)
    dm = lambda: _batches(*[0.01] * 8)  # noqa: E731
    straight = _trainer("16-mixed", max_steps=8)
    straight.fit(_small(), dm())
    assert straight.loss_scale == 2.0**17  # grown after steps 3 and 6
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=5)
    _trainer("16-mixed", max_steps=5, callbacks=[ckpt]).fit(_small(), dm())
    resumed = _trainer("16-mixed", max_steps=8, callbacks=[ModelCheckpoint(tmp_path)])
    resumed.fit(_small(), dm(), ckpt_path="last")
    assert resumed.loss_scale == 2.0**17  # a fresh scale would have grown once, at step 8


class _BatchNormNet(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(8, 16, key=k1)
        self.norm = eqx.nn.BatchNorm(16, axis_name="batch", mode="batch")
        self.head = eqx.nn.Linear(16, 4, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.norm(jax.nn.relu(self.linear(x)), state)
        return self.head(h), state


def test_bf16_mixed_keeps_batch_norm_statistics_in_float32():
    model, state = eqx.nn.make_with_state(_BatchNormNet)(jax.random.key(0))
    optimizer = solstice.OptaxOptimizer(optax.adam(1e-2), model)
    start = solstice.ClassificationExperiment(model, optimizer, num_classes=4, state=state)
    trainer = _trainer("bf16-mixed", max_epochs=2)
    trained = trainer.fit(start, blobs_datamodule())
    assert _floating_dtypes(trained) == {"float32"}
    before, after = jax.tree.leaves(start.state), jax.tree.leaves(trained.state)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # statistics moved
    assert trainer.callback_metrics["val/accuracy"] > 0.8


class TwoUpdatesPerStep(Scaled):
    """A train_step that scans over two halves of its batch, updating the model once per
    half: the model travels through the `lax.scan` carry."""

    def train_step(self, batch):
        x, y = batch
        halves = (x.reshape(2, -1, 3), y.reshape(2, -1))

        def update(carry, half):
            model, optimizer = carry
            hx, hy = half

            def loss(model):
                out = jax.vmap(model)(hx)[:, 0].astype(jnp.float32)
                return solstice.scale_loss(jnp.mean((out - hy) ** 2))

            grads = eqx.filter_grad(loss)(model)
            updates, optimizer = optimizer(grads, eqx.filter(model, eqx.is_array))
            return (eqx.apply_updates(model, updates), optimizer), None

        (model, optimizer), _ = jax.lax.scan(update, (self.model, self.optimizer), halves)
        new = eqx.tree_at(lambda e: (e.model, e.optimizer), self, (model, optimizer))
        return new, SquaredError(jax.vmap(self.model)(x)[:, 0] - y)


def test_a_model_updated_inside_the_steps_own_loop_is_explained():
    # bf16 weights + float32 updates are float32: the scan's carry changes dtype
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    start = TwoUpdatesPerStep(model, solstice.SGDOptimizer(model, 0.05))
    assert int(_trainer("32-true", max_steps=2).fit(start, _batches(0.1, 0.1)).optimizer.count) == 4
    with pytest.raises(TypeError, match="carry") as caught:
        _trainer("bf16-mixed", max_steps=1).fit(start, _batches(0.1))
    assert "Update the model once per step" in "\n".join(caught.value.__notes__)


def test_bf16_mixed_data_parallel_matches_one_device():
    def weights(experiment):
        arrays = jax.tree.leaves(eqx.filter(experiment.model, eqx.is_array))
        return np.concatenate([np.ravel(x) for x in arrays])

    def trained(devices):
        trainer = _trainer("bf16-mixed", max_epochs=1, devices=devices)
        exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
        assert _floating_dtypes(exp) == {"float32"}
        return weights(exp)

    start = weights(make_mlp_experiment(in_size=8, num_classes=4))
    one, two = trained(1), trained(2)
    moved = np.max(np.abs(one - start))
    assert moved > 1e-2
    assert np.max(np.abs(one - two)) < 0.05 * moved  # bf16 sums in another order


def test_bf16_mixed_composes_with_microbatches():
    """Microbatches run under the policy (not silently in float32): K=2 batches of 32 under
    bf16-mixed end near one batch of 64 under bf16-mixed, and away from float32's result."""
    import equinox as eqx
    from helpers import blobs_datamodule, make_mlp_experiment

    start = make_mlp_experiment(in_size=8, num_classes=4, lr=1e-2)

    def flat(e):
        leaves = jax.tree.leaves(eqx.filter(e.model, eqx.is_array))
        return np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)

    def fit(batch_size, **kw):
        trainer = solstice.Trainer(
            max_epochs=2, enable_progress_bar=False, num_sanity_val_steps=0, **kw
        )
        trained = trainer.fit(start, blobs_datamodule(batch_size=batch_size, shuffle=False))
        assert all(
            x.dtype == jnp.float32
            for x in jax.tree.leaves(eqx.filter(trained, eqx.is_inexact_array))
        )
        return flat(trained)

    movement = np.abs(fit(64) - flat(start)).max()
    micro = fit(32, precision="bf16-mixed", accumulate_grad_batches=2)
    big = fit(64, precision="bf16-mixed")
    float32 = fit(32, accumulate_grad_batches=2)
    assert np.abs(micro - big).max() < 0.05 * movement
    assert np.abs(micro - float32).max() > 0.01 * movement  # the policy did apply


def test_16_mixed_with_microbatches_is_refused():
    with pytest.raises(ValueError, match="dynamic loss scaling does not yet run across"):
        solstice.Trainer(max_epochs=1, precision="16-mixed", accumulate_grad_batches=2)
