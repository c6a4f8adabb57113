"""Observing a run: profiler traces, device and host memory, in-step norms, FLOPs and MFU."""

import glob
import itertools
import logging
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SquaredError, make_mlp_experiment, regression, regression_split
from test_no_sync import _PerStepReads, _ReadCounter

import solstice
from solstice.callbacks import (
    DeviceStatsMonitor,
    ModelSummary,
    NormMonitor,
    ProfilerCallback,
    ThroughputMonitor,
)
from solstice.callbacks._compile_timer import CompileTimer
from solstice.datamodules import ArrayDataModule


def _trainer(callbacks, steps, log_every=50, **kw):
    return solstice.Trainer(
        max_steps=steps,
        log_every_n_steps=log_every,
        callbacks=callbacks,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _logged(trainer, name):
    trainer.flush_logs()
    return dict(zip(trainer.history.steps[name], trainer.history.metrics[name]))


# ---------------------------------------------------------------------- NormMonitor
def _sgd_by_hand(model, x, y, lr, steps):
    """The (grads, params, updates) of each of `steps` full-batch SGD steps."""
    params, static = eqx.partition(model, eqx.is_array)
    out = []
    for _ in range(steps):

        def loss(p):
            m = eqx.combine(p, static)
            return jnp.mean((jax.vmap(m)(jnp.asarray(x))[:, 0] - y) ** 2)

        grads = jax.grad(loss)(params)
        updates = jax.tree.map(lambda g: -lr * g, grads)
        out.append((grads, params, updates))
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return out


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in tree)))


def test_norms_are_those_of_each_logged_step_computed_by_hand():
    # one batch per epoch: an epoch's end logs its step, so steps 1, 2, 3 are all logged
    x, y = regression_split(64, 0)
    start = regression(lr=0.05)
    trainer = _trainer([NormMonitor(per_module=True)], 3, log_every=3)
    trainer.fit(start, ArrayDataModule(train=(x, y), batch_size=64, seed=0))
    by_hand = _sgd_by_hand(start.model, x, y, 0.05, 3)
    for kind, index in (("grad", 0), ("param", 1), ("update", 2)):
        logged = _logged(trainer, f"train/{kind}_norm")
        assert sorted(logged) == [1, 2, 3]
        for step, trees in enumerate(by_hand, start=1):
            tree = trees[index]
            np.testing.assert_allclose(logged[step], _norm(jax.tree.leaves(tree)), rtol=2e-5)
            for module in ("weight", "bias"):
                value = _logged(trainer, f"train/{kind}_norm/{module}")[step]
                np.testing.assert_allclose(value, _norm([getattr(tree, module)]), rtol=2e-5)


def test_norms_of_a_log_interval_are_its_last_steps():
    x, y = regression_split(64, 0)
    start = regression(lr=0.05)
    trainer = _trainer([NormMonitor()], 4, log_every=2)
    dm = ArrayDataModule(train=(x, y), batch_size=16, seed=0, shuffle=False)
    trainer.fit(start, dm)
    logged = _logged(trainer, "train/grad_norm")
    assert sorted(logged) == [2, 4]  # one value per interval, as `train/loss`
    assert sorted(_logged(trainer, "train/mse")) == [2, 4]


def test_norm_monitor_adds_no_host_read_on_the_training_thread(monkeypatch):
    counter = _ReadCounter()
    counter.install(monkeypatch)
    probe = _PerStepReads(counter)
    trainer = solstice.Trainer(
        max_epochs=2,
        log_every_n_steps=2,
        callbacks=[probe, NormMonitor(per_module=True)],
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        devices=1,
    )
    x, y = regression_split(128, 0)
    trainer.fit(regression(), ArrayDataModule(train=(x, y), batch_size=16, seed=0))
    assert len(probe.reads_per_step) == 16
    assert sum(probe.reads_per_step) == 0, probe.reads_per_step
    norms = trainer.history.metrics["train/grad_norm"]
    assert len(norms) == 8 and all(np.isfinite(norms)) and all(n > 0 for n in norms)


def test_per_module_norms_need_a_model_shaped_optimizer_input():
    class Hand(solstice.Experiment):
        w: jax.Array
        optimizer: solstice.Optimizer

        def train_step(self, batch):
            x, y = batch
            grad = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(self.w)
            updates, opt = self.optimizer(grad, self.w)
            return Hand(self.w + updates, opt), SquaredError(grad)

        def eval_step(self, batch):
            raise NotImplementedError

    exp = Hand(jnp.zeros(3), solstice.OptaxOptimizer(optax.sgd(0.1), jnp.zeros(3)))
    x, y = regression_split(16, 0)
    with pytest.raises(ValueError, match="has no `model` field"):
        _trainer([NormMonitor(per_module=True)], 1).fit(
            exp, ArrayDataModule(train=(x, y), batch_size=16)
        )


# ---------------------------------------------------------------------- FLOPs, throughput
IN, WIDTH, OUT, BATCH = 64, 256, 10, 128


def _mlp_fit(callbacks, steps=6, spe=1, log_every=2):
    exp = make_mlp_experiment(in_size=IN, num_classes=OUT, width=WIDTH)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.normal(size=(BATCH * 4, IN)).astype(np.float32),
        "label": rng.integers(0, OUT, BATCH * 4).astype(np.int32),
    }
    trainer = _trainer(callbacks, steps, log_every=log_every, steps_per_execution=spe)
    trainer.fit(exp, ArrayDataModule(train=data, batch_size=BATCH, seed=0))
    return trainer


def test_flops_per_step_match_the_analytic_count_and_mfu_uses_the_peak():
    monitor, summary = ThroughputMonitor(peak_flops=1e12), ModelSummary()
    trainer = _mlp_fit([monitor, summary])
    # dense layers: 2*in*out FLOPs per sample forward, x3 with the backward pass...
    analytic = 3 * 2 * BATCH * (IN * WIDTH + WIDTH * OUT)
    # ...less the input's gradient, which nothing needs (the matmuls' exact count)
    matmuls = analytic - 2 * BATCH * IN * WIDTH
    watch = CompileTimer()
    watch.start()
    cost = trainer.train_step_cost()
    watch.stop()
    assert watch.stats.compilations == 0 and watch.stats.trace_secs == 0  # JAX's cache
    # XLA adds the activations, the loss and Adam's update to the matmuls
    assert matmuls <= cost.flops <= 1.25 * matmuls, (cost.flops, matmuls)
    assert 0.7 * analytic <= cost.flops <= analytic
    assert cost.flops == pytest.approx(cost.flops_per_device * cost.num_devices)
    assert summary.flops_per_step == cost.flops
    flops = _logged(trainer, "throughput/flops_per_step")
    assert sorted(flops) == [2, 4, 6]
    assert list(flops.values()) == pytest.approx([cost.flops] * 3)
    samples = _logged(trainer, "time/samples_per_sec")
    steps = _logged(trainer, "time/steps_per_sec")
    per_sec = _logged(trainer, "throughput/flops_per_sec")
    mfu = _logged(trainer, "throughput/mfu")
    for s in (2, 4, 6):
        assert samples[s] == pytest.approx(steps[s] * BATCH, rel=1e-5) and samples[s] > 0
        assert per_sec[s] == pytest.approx(steps[s] * cost.flops, rel=1e-5)
        assert mfu[s] == pytest.approx(per_sec[s] / (1e12 * cost.num_devices), rel=1e-5)
    assert monitor.mfu == pytest.approx(
        monitor.steady_steps_per_sec * cost.flops / (1e12 * cost.num_devices)
    )


def test_fused_steps_report_the_flops_of_one_step():
    # XLA's cost analysis counts a scan's body once: the single step is analysed instead
    fused = _mlp_fit([], steps=4, spe=2).train_step_cost()
    matmuls = 2 * BATCH * (2 * IN * WIDTH + 3 * WIDTH * OUT)
    assert matmuls <= fused.flops <= 1.25 * matmuls


def test_no_mfu_on_a_cpu_and_it_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="solstice"):
        trainer = _mlp_fit([ThroughputMonitor()], steps=2)
    assert "no MFU is logged" in caplog.text
    assert "throughput/mfu" not in trainer.history.metrics
    assert "throughput/flops_per_sec" in trainer.history.metrics


def test_peak_flops_table():
    from solstice.callbacks._throughput import peak_flops

    class Kind:
        def __init__(self, kind):
            self.device_kind = kind

    assert peak_flops(Kind("NVIDIA H100 80GB HBM3"), "bfloat16") == 989.4e12
    assert peak_flops(Kind("NVIDIA H100 PCIe"), "float32") == 51.2e12
    assert peak_flops(Kind("NVIDIA A100-SXM4-40GB"), "float32") == 19.5e12
    assert peak_flops(Kind("TPU v5 lite"), "bfloat16") == 197e12
    assert peak_flops(Kind("TPU v4"), "float32") is None
    assert peak_flops(Kind("cpu"), "float32") is None
    with pytest.raises(ValueError, match="'bfloat16' and 'float32'"):
        ThroughputMonitor(dtype="fp8")


# ---------------------------------------------------------------------- DeviceStatsMonitor
def test_device_stats_log_host_memory_and_say_the_cpu_reports_none(caplog):
    with caplog.at_level(logging.INFO, logger="solstice"):
        trainer = _mlp_fit([DeviceStatsMonitor()], steps=4)
    assert caplog.text.count("reports no memory statistics") == 1
    rss = _logged(trainer, "device_stats/host/rss_bytes")
    peak = _logged(trainer, "device_stats/host/peak_rss_bytes")
    assert sorted(rss) == [2, 4]
    for step in rss:  # a JAX process holds at least 50 MB, and less than the machine
        assert 50e6 < rss[step] <= peak[step] < 1e12
    assert not [k for k in trainer.history.metrics if k.startswith("device_stats/cpu")]


def test_device_stats_of_a_backend_that_reports_them():
    class FakeDevice:
        platform, id, process_index = "gpu", 3, 0

        def memory_stats(self):
            return {"bytes_in_use": 5, "peak_bytes_in_use": 7, "bytes_limit": 9, "other": 1}

    stats = DeviceStatsMonitor(cpu_stats=False).device_stats([FakeDevice()])
    assert stats == {
        "device_stats/gpu3/bytes_in_use": 5.0,
        "device_stats/gpu3/peak_bytes_in_use": 7.0,
        "device_stats/gpu3/bytes_limit": 9.0,
    }


# ---------------------------------------------------------------------- ProfilerCallback
def _xplanes(directory):
    return glob.glob(os.path.join(directory, "plugins", "profile", "*", "*.xplane.pb"))


def test_profiler_traces_the_step_range_beside_the_logs(tmp_path):
    profiler = ProfilerCallback(start_step=3, num_steps=2)
    logger = solstice.CSVLogger(tmp_path / "logs")
    trainer = _trainer([profiler], 6, loggers=[logger])
    x, y = regression_split(64, 0)
    trainer.fit(regression(), ArrayDataModule(train=(x, y), batch_size=16, seed=0))
    (trace,) = profiler.traces
    assert (trace.first_step, trace.last_step) == (3, 4)
    assert trace.dirpath == os.path.join(str(tmp_path / "logs"), "profile", "step_3")
    (xplane,) = _xplanes(trace.dirpath)
    assert os.path.getsize(xplane) > 0


def test_profiler_repeats_every_so_many_seconds(tmp_path):
    clock = itertools.count(0, 100).__next__  # 100 s pass between any two looks
    profiler = ProfilerCallback(tmp_path, start_step=2, num_steps=2, every_seconds=150, clock=clock)
    x, y = regression_split(64, 0)
    trainer = _trainer([profiler], 8)
    trainer.fit(regression(), ArrayDataModule(train=(x, y), batch_size=16, seed=0))
    assert [(t.first_step, t.last_step) for t in profiler.traces] == [(2, 3), (6, 7)]
    for trace in profiler.traces:
        assert len(_xplanes(trace.dirpath)) == 1


def test_profiler_needs_a_directory():
    x, y = regression_split(16, 0)
    with pytest.raises(ValueError, match="no logger of this Trainer has a `log_dir`"):
        dm = ArrayDataModule(train=(x, y), batch_size=16)
        _trainer([ProfilerCallback()], 1).fit(regression(), dm)


def test_a_resumed_run_logs_the_norms_of_an_uninterrupted_one(tmp_path):
    from solstice.callbacks import ModelCheckpoint

    x, y = regression_split(64, 0)

    def fit(steps, *callbacks, ckpt_path=None):
        trainer = _trainer([NormMonitor(per_module=True), *callbacks], steps, log_every=2)
        dm = ArrayDataModule(train=(x, y), batch_size=16, seed=0)
        trainer.fit(regression(), dm, ckpt_path=ckpt_path)
        return trainer

    straight = fit(6)
    fit(3, ModelCheckpoint(tmp_path, every_n_train_steps=3, every_n_epochs=None))
    resumed = fit(6, ModelCheckpoint(tmp_path, every_n_train_steps=3), ckpt_path="last")
    for name in ("train/grad_norm", "train/update_norm/weight"):
        expected = _logged(straight, name)
        assert sorted(expected) == [2, 4, 6]  # (step 2 from the checkpoint's history)
        assert _logged(resumed, name) == pytest.approx(expected, rel=1e-6)
