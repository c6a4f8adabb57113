"""Speed features: fused steps, prefetching, donation, the compilation cache and timer, devices."""

import os
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs, blobs_datamodule, make_mlp_experiment, params_of

import solstice
from solstice.callbacks import Callback
from solstice.callbacks._compile_timer import CompileTimer
from solstice.datamodules import ArrayDataModule
from solstice.trainer._feeder import Feeder
from solstice.trainer._placement import Placement


def _trainer(**kw):
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("devices", 1)
    return solstice.Trainer(**kw)


def _exp(seed=0):
    return make_mlp_experiment(seed=seed, in_size=8, num_classes=4)


def _fit(n_train=256, batch_size=32, **kw):
    trainer = _trainer(**kw)
    exp = trainer.fit(_exp(), blobs_datamodule(n_train=n_train, batch_size=batch_size))
    trainer.flush_logs()
    return trainer, exp


def _assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(params_of(a), params_of(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _assert_same_history(h1, h4):
    assert h1.steps == h4.steps
    assert set(h1.metrics) == set(h4.metrics)
    for name in h1.metrics:
        np.testing.assert_allclose(h1.metrics[name], h4.metrics[name], rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- fused steps


def test_fused_steps_match_single_steps():
    # 8 batches per epoch, a multiple of K: every call is fused
    t1, e1 = _fit(max_epochs=3, log_every_n_steps=4)
    t4, e4 = _fit(max_epochs=3, log_every_n_steps=4, steps_per_execution=4)
    _assert_same_params(e1, e4, rtol=1e-6, atol=1e-7)  # bit-identical on CPU today
    _assert_same_history(t1.history, t4.history)
    assert t4.global_step == t1.global_step == 24
    assert t4.trace_log.count("train_many") == 1
    assert t4.trace_log.count("train") == 0


def test_fused_ragged_epoch_compiles_one_extra_function():
    # 10 batches per epoch with K=4: fused calls, and single steps where an epoch ends
    # (and where the next one starts, until the step count is a multiple of K again)
    t1, e1 = _fit(n_train=320, max_epochs=3, log_every_n_steps=4)
    t4, e4 = _fit(n_train=320, max_epochs=3, log_every_n_steps=4, steps_per_execution=4)
    _assert_same_params(e1, e4)
    assert t4.global_step == 30
    assert t4.trace_log.count("train_many") == 1
    assert t4.trace_log.count("train") == 1
    for name in ("train/loss_epoch", "train/accuracy_epoch"):
        np.testing.assert_allclose(t1.history.metrics[name], t4.history.metrics[name], rtol=1e-6)


def test_fused_ragged_epoch_logs_like_single_steps():
    t1, _ = _fit(n_train=320, max_epochs=3, log_every_n_steps=4)
    t4, _ = _fit(n_train=320, max_epochs=3, log_every_n_steps=4, steps_per_execution=4)
    _assert_same_history(t1.history, t4.history)


class _StepRecorder(Callback):
    def __init__(self):
        self.starts, self.ends, self.losses, self.labels = [], [], [], []

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        self.starts.append((trainer.current_epoch, batch_idx))
        self.labels.append(np.asarray(batch["label"]))

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.ends.append((trainer.current_epoch, batch_idx))
        self.losses.append(float(metrics.compute()["loss"]))


def test_fused_steps_call_per_batch_hooks_for_every_step():
    recorders = {}
    for k in (1, 4):
        recorders[k] = rec = _StepRecorder()
        _fit(n_train=320, max_epochs=2, log_every_n_steps=4, steps_per_execution=k, callbacks=[rec])
    r1, r4 = recorders[1], recorders[4]
    expected = [(e, b) for e in range(2) for b in range(10)]
    assert r1.starts == r1.ends == expected
    assert r4.starts == r4.ends == expected
    np.testing.assert_allclose(r1.losses, r4.losses, rtol=1e-6)
    for a, b in zip(r1.labels, r4.labels, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_steps", [6, 10, 13])
def test_fused_steps_respect_max_steps_mid_chunk(max_steps):
    t1, e1 = _fit(max_epochs=None, max_steps=max_steps, log_every_n_steps=4)
    t4, e4 = _fit(max_epochs=None, max_steps=max_steps, log_every_n_steps=4, steps_per_execution=4)
    assert t4.global_step == t1.global_step == max_steps
    assert t4.current_epoch == t1.current_epoch
    _assert_same_params(e1, e4)
    assert t4.trace_log.count("train_many") == 1
    assert t4.trace_log.count("train") <= 1


def test_fused_steps_on_four_devices_match_one_device():
    _, e1 = _fit(max_epochs=2, log_every_n_steps=4)
    t4, e4 = _fit(max_epochs=2, log_every_n_steps=4, steps_per_execution=4, devices=4)
    assert len(params_of(e4)[0].sharding.device_set) == 4
    _assert_same_params(e1, e4)


# ---------------------------------------------------------------- feeding


class _CountingLoader:
    """A loader that counts how many batches were taken from it, and by which thread."""

    def __init__(self, batches):
        self.batches = batches
        self.taken = 0
        self.threads = set()
        self.changed = threading.Condition()

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            with self.changed:
                self.taken += 1
                self.threads.add(threading.current_thread().name)
                self.changed.notify_all()
            yield batch

    def wait_for(self, n, timeout=10.0):
        with self.changed:
            return self.changed.wait_for(lambda: self.taken >= n, timeout=timeout)


def _host_batches(n, size=8):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(size, 3)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("depth", [2, 3])
def test_feeder_places_batches_ahead_on_its_own_thread(depth):
    placement = Placement(1)
    loader = _CountingLoader(_host_batches(12))
    seen = []
    with Feeder(loader, lambda b: b, placement, depth=depth) as feeder:
        for i, (n, batch) in enumerate(feeder):
            assert n == 1 and isinstance(batch["x"], jax.Array)
            # while step i runs, `depth` later batches are ready on the device (or all of them)
            assert loader.wait_for(min(12, i + 1 + depth)), (i, loader.taken)
            time.sleep(0.002)
            # ... and no more than depth + 1 are taken ahead: memory stays bounded
            assert loader.taken <= i + depth + 2
            seen.append(np.asarray(batch["x"]))
    assert loader.threads == {"solstice-feeder"}
    for got, want in zip(seen, loader.batches, strict=True):
        np.testing.assert_array_equal(got, want["x"])


def test_trainer_prefetches_while_the_step_runs():
    data = blobs_datamodule(n_train=320)
    loader = _CountingLoader(list(data.train_dataloader()))
    ahead = []

    class Data(solstice.datamodules.DataModule):
        def train_dataloader(self):
            return loader

    class Probe(Callback):
        def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
            ahead.append(loader.wait_for(min(len(loader), batch_idx + 1 + 2)))

    trainer = _trainer(max_epochs=1, prefetch=2, callbacks=[Probe()])
    trainer.fit(_exp(), Data())
    assert all(ahead) and len(ahead) == 10
    assert loader.threads == {"solstice-feeder"}


def test_experiment_buffers_are_donated():
    held = []

    class Keep(Callback):
        def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
            held.append(params_of(experiment))

    for k, devices in ((1, 1), (4, 4)):
        held.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _fit(
                max_epochs=1,
                steps_per_execution=k,
                devices=devices,
                log_every_n_steps=4,
                callbacks=[Keep()],
            )
        assert not [w for w in caught if "donat" in str(w.message).lower()]
        # the buffers every step consumed were given to the next step: deleted, not copied
        chunks = held[::k]
        for old in chunks[:-1]:
            assert all(p.is_deleted() for p in old)
        assert not any(p.is_deleted() for p in chunks[-1])


# ---------------------------------------------------------------- compilation cache


def _small_data():
    """Two training batches, no evaluation splits: few functions to compile."""
    return ArrayDataModule(train=blobs(64), batch_size=32)


@pytest.fixture
def fresh_compilation_cache():
    """Restore JAX's cache settings afterwards, and let the test start an uninitialised cache
    (JAX opens its persistent cache once per process)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def test_compilation_cache_writes_entries_and_is_reused(tmp_path, fresh_compilation_cache):
    cache = tmp_path / "jax-cache"
    trainer = _trainer(max_epochs=1, compilation_cache=str(cache))
    assert trainer.compilation_cache_dir == cache and cache.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(cache)
    jax.clear_caches()  # compile everything now, not from earlier tests' in-memory caches
    with CompileTimer() as cold:
        trainer.fit(_exp(), _small_data())
    entries = os.listdir(cache)
    assert entries, "no executable was written to the persistent cache"
    assert cold.stats.cache_misses >= 1 and cold.stats.compilations >= 1

    # a new Trainer (same shapes) compiles nothing: every step comes from the cache
    jax.clear_caches()
    with CompileTimer() as warm:
        _trainer(max_epochs=1, compilation_cache=str(cache)).fit(_exp(), _small_data())
    assert warm.stats.cache_hits >= 1
    assert warm.stats.cache_misses == 0


def test_compilation_cache_default_dir_is_per_user(tmp_path, monkeypatch, fresh_compilation_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trainer = _trainer(max_epochs=1)
    assert trainer.compilation_cache_dir == tmp_path / "solstice" / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "solstice" / "jax")


def test_compilation_cache_opt_out_leaves_jax_config_alone(fresh_compilation_cache):
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    trainer = _trainer(max_epochs=1, compilation_cache=False)
    assert trainer.compilation_cache_dir is None
    after = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    assert after == before


def test_compilation_cache_dir_can_change_within_a_process(tmp_path, fresh_compilation_cache):
    first, second = tmp_path / "first", tmp_path / "second"
    _trainer(max_epochs=1, compilation_cache=str(first)).fit(_exp(), _small_data())
    assert os.listdir(first)
    _trainer(max_epochs=1, compilation_cache=str(second)).fit(_exp(seed=1), _small_data())
    assert os.listdir(second)


def test_compile_timer_reports_compile_time():
    timer = CompileTimer()
    with timer:
        jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)(jnp.arange(7.0)).block_until_ready()
    stats = timer.stats
    assert not timer.active
    assert stats.compilations >= 1 and stats.backend_secs > 0 and stats.trace_secs > 0
    assert stats.total_secs == pytest.approx(
        stats.trace_secs + stats.lower_secs + stats.backend_secs
    )
    assert any("lambda" in name for name in stats.by_function)
    metrics = stats.as_metrics()
    assert metrics["compile/total_secs"] == pytest.approx(stats.total_secs)
    # stopped: nothing more is counted
    jax.jit(lambda x: jnp.cos(x) - 2.0)(jnp.arange(5.0)).block_until_ready()
    assert timer.stats == stats
    timer.reset()
    assert timer.stats.compilations == 0


# ---------------------------------------------------------------- devices


def test_devices_argument_builds_the_mesh():
    devices = jax.devices()
    assert len(devices) >= 4
    assert _trainer(max_epochs=1, devices="auto").devices == devices
    assert _trainer(max_epochs=1, devices=2).devices == devices[:2]
    chosen = [devices[3], devices[1]]
    trainer = _trainer(max_epochs=1, devices=chosen)
    assert trainer.devices == chosen
    assert trainer.mesh.axis_names == ("batch",)
    assert list(trainer.mesh.devices.flat) == chosen


@pytest.mark.parametrize(
    ("devices", "error"),
    [
        (0, ValueError),
        (99, ValueError),
        (True, TypeError),
        ("gpu", TypeError),
        ([], TypeError),
        (["cpu:0"], TypeError),
        ("dup", ValueError),
    ],
)
def test_bad_devices_raise(devices, error):
    if devices == "dup":
        devices = [jax.devices()[0]] * 2
    with pytest.raises(error, match="devices"):
        _trainer(max_epochs=1, devices=devices)


def test_chosen_devices_match_one_device():
    _, e1 = _fit(max_epochs=2)
    t2, e2 = _fit(max_epochs=2, devices=jax.devices()[2:4])
    assert params_of(e2)[0].sharding.device_set == set(jax.devices()[2:4])
    _assert_same_params(e1, e2)


def test_placement_replicate_copies_unless_told_not_to():
    placement = Placement(4)
    x = placement.replicate({"w": np.arange(8.0, dtype=np.float32), "k": jax.random.key(1)})
    assert x["w"].sharding.is_equivalent_to(placement.replicated, 1)
    assert jax.dtypes.issubdtype(x["k"].dtype, jax.dtypes.prng_key)
    copied = placement.replicate(x)
    aliased = placement.replicate(x, copy=False)
    assert _ptr(copied["w"]) != _ptr(x["w"])
    assert _ptr(aliased["w"]) == _ptr(x["w"])
    host = placement.to_host(x["w"])
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.arange(8.0))


def _ptr(x):
    return x.addressable_data(0).unsafe_buffer_pointer()


# ---------------------------------------------------------------- sharding rules (FSDP)


def test_fully_sharded_rule_splits_large_arrays_and_trains_like_replicated():
    import equinox as eqx

    from solstice.trainer._sharding_rules import (
        ByPath,
        FullySharded,
        describe_shardings,
        experiment_shardings,
    )

    placement = Placement(4)
    exp = _exp()
    dyn, static = eqx.partition(exp, eqx.is_array)
    rules = [
        ByPath([(r"\.model\.layers\[1\]\.layers\[0\]\.bias$", jax.sharding.PartitionSpec())]),
        FullySharded(min_size=64),
    ]
    shardings = experiment_shardings(dyn, placement.mesh, rules)
    specs = {
        jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)
    }
    weight = ".model.layers[1].layers[0].weight"  # (32, 8): split along its 32 rows
    assert specs[weight] == jax.sharding.PartitionSpec("batch", None)
    assert specs[".model.layers[1].layers[1].weight"] == jax.sharding.PartitionSpec(None, "batch")
    assert specs[".model.layers[1].layers[0].bias"] == jax.sharding.PartitionSpec()
    assert specs[".key"] == jax.sharding.PartitionSpec()  # keys are never split
    # Adam's moments have their parameters' shapes, so they are split the same way
    assert any(
        k.endswith(weight.removeprefix(".model")) and "mu" in k and v == specs[weight]
        for k, v in specs.items()
    )
    assert "per device" in describe_shardings(dyn, shardings)

    sharded = placement.shard(dyn, shardings)
    assert sharded.model.layers[1].layers[0].weight.addressable_shards[0].data.shape == (8, 8)
    replicated = placement.replicate(dyn)

    def step(dyn, batch, out_shardings):
        new, _ = eqx.combine(dyn, static).train_step(batch)
        return jax.lax.with_sharding_constraint(eqx.filter(new, eqx.is_array), out_shardings)

    fsdp = jax.jit(lambda d, b: step(d, b, shardings))
    ddp = jax.jit(lambda d, b: step(d, b, placement.replicated))
    data = blobs_datamodule(batch_size=32)
    for batch in list(data.train_dataloader())[:3]:
        batch = placement.put_batch(batch)
        sharded, replicated = fsdp(sharded, batch), ddp(replicated, batch)
    assert sharded.model.layers[1].layers[0].weight.sharding.spec == specs[weight]
    for a, b in zip(params_of(sharded), params_of(replicated), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sharding_rule_errors_teach():
    from solstice.trainer._sharding_rules import ByPath, experiment_shardings

    placement = Placement(4)
    tree = {"w": np.zeros((6, 8), np.float32)}
    P = jax.sharding.PartitionSpec
    with pytest.raises(ValueError, match="not divisible by 4"):
        experiment_shardings(tree, placement.mesh, [ByPath([("w", P("batch", None))])])
    with pytest.raises(ValueError, match="no axis 'model'"):
        experiment_shardings(tree, placement.mesh, [ByPath([("w", P(None, "model"))])])
    with pytest.raises(ValueError, match="more entries"):
        experiment_shardings(tree, placement.mesh, [ByPath([("w", P(None, None, "batch"))])])


def test_trainer_sharding_rules_keep_arrays_split_and_train_like_replicated(tmp_path):
    rules = [solstice.FullySharded(min_size=64)]
    weight = lambda e: e.model.layers[1].layers[0].weight  # noqa: E731 - (32, 8)

    replicated_trainer, replicated = _fit(max_epochs=2, devices=4)
    trainer, sharded = _fit(max_epochs=2, devices=4, sharding_rules=rules)
    _assert_same_params(sharded, replicated)
    _assert_same_history(replicated_trainer.history, trainer.history)
    # the returned experiment's arrays are still split: each device holds a quarter
    assert weight(sharded).sharding.spec == jax.sharding.PartitionSpec("batch", None)
    assert weight(sharded).addressable_shards[0].data.shape == (8, 8)
    assert "(8, 8)" not in trainer.describe_shardings()  # it lists global shapes
    assert "P('batch', None)" in trainer.describe_shardings()

    # a checkpoint of the split experiment resumes into split arrays, exactly
    def with_checkpoints(**kw):
        ckpt = solstice.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=5)
        return _trainer(devices=4, sharding_rules=rules, callbacks=[ckpt], max_epochs=2, **kw)

    with_checkpoints(max_steps=5).fit(_exp(), blobs_datamodule(batch_size=32))
    resumed_trainer = with_checkpoints()
    resumed = resumed_trainer.fit(_exp(), blobs_datamodule(batch_size=32), ckpt_path="last")
    assert resumed_trainer.global_step == trainer.global_step
    assert weight(resumed).sharding.is_equivalent_to(weight(sharded).sharding, 2)
    assert weight(resumed).addressable_shards[0].data.shape == (8, 8)
    for a, b in zip(params_of(resumed), params_of(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_trainer_sharding_rules_errors_teach():
    with pytest.raises(TypeError, match="Wrap a single rule in a list"):
        solstice.Trainer(max_epochs=1, sharding_rules=solstice.FullySharded())
    with pytest.raises(TypeError, match="not a rule"):
        solstice.Trainer(max_epochs=1, sharding_rules=["fsdp"])
