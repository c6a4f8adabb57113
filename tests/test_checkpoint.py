"""Checkpoints: save/load, structure checks, retention, corruption and failed saves."""

import hashlib
import json
import os
import threading
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
import solstice.checkpointing._orbax as orbax_io
from solstice.callbacks import Callback, ModelCheckpoint
from solstice.checkpointing import CheckpointError, verify
from solstice.checkpointing._find import find_last


def _exp(seed=0, width=32):
    return make_mlp_experiment(seed=seed, in_size=8, num_classes=4, width=width)


def _trainer(**kw):
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("devices", 1)
    kw.setdefault("log_every_n_steps", 4)
    return solstice.Trainer(**kw)


def _bits(tree):
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_array)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out[jax.tree_util.keystr(path)] = np.asarray(x).tobytes()
    return out


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _checkpoints(dirpath) -> list[str]:
    return sorted(p.name for p in Path(dirpath).iterdir() if (p / "solstice.json").exists())


# ---------------------------------------------------------------------- export
def test_save_load_round_trip(tmp_path):
    class Holder(eqx.Module):
        weak: jax.Array
        host: np.ndarray
        key: jax.Array
        name: str = eqx.field(static=True)

    trained = _trainer(max_epochs=1).fit(_exp(), blobs_datamodule())
    solstice.save(tmp_path / "exp", trained)
    restored = solstice.load(tmp_path / "exp", like=_exp(seed=5))
    assert _bits(restored) == _bits(trained)
    assert type(restored) is type(trained) and restored.num_classes == 4
    # an abstract template allocates nothing before the load
    abstract = solstice.load(tmp_path / "exp", like=eqx.filter_eval_shape(_exp))
    assert _bits(abstract) == _bits(trained)

    # any eqx.Module: a model alone, weak types, numpy leaves and PRNG keys kept as they were
    holder = Holder(jnp.asarray(0.5), np.arange(3.0), jax.random.key(3), "x")
    solstice.save(tmp_path / "holder", holder)
    back = solstice.load(
        tmp_path / "holder", like=Holder(jnp.asarray(0.0), np.zeros(3), jax.random.key(0), "x")
    )
    assert back.weak.weak_type and float(back.weak) == 0.5
    assert isinstance(back.host, np.ndarray) and back.host.tolist() == [0.0, 1.0, 2.0]
    assert (jax.random.key_data(back.key) == jax.random.key_data(holder.key)).all()

    with pytest.raises(FileExistsError, match="never overwrites"):
        solstice.save(tmp_path / "exp", trained)
    with pytest.raises(FileNotFoundError):
        solstice.load(tmp_path / "nothing", like=trained)
    # nothing is pickled: the metadata is JSON
    document = json.loads((tmp_path / "exp" / "solstice.json").read_text())
    assert document["kind"] == "export" and document["format_version"] == 1


def test_structure_mismatch_lists_leaves_by_path(tmp_path):
    solstice.save(tmp_path / "exp", _exp(width=32))
    with pytest.raises(ValueError) as info:
        solstice.load(tmp_path / "exp", like=_exp(width=16))
    message = str(info.value)
    assert "shape or dtype mismatch" in message
    assert (
        ".model.layers[1].layers[0].weight: checkpoint float32[32, 8], template float32[16, 8]"
        in message
    )
    assert ".optimizer.opt_state[0].mu.layers[1].layers[0].weight" in message

    # a template with another layer and without the PRNG key: missing and unexpected leaves
    deeper = eqx.tree_at(
        lambda e: e.model,
        _exp(),
        eqx.nn.Sequential(
            [eqx.nn.Lambda(jnp.ravel), eqx.nn.MLP(8, 4, 32, 2, key=jax.random.key(0))]
        ),
    )
    with pytest.raises(ValueError) as info:
        solstice.load(tmp_path / "exp", like=deeper)
    message = str(info.value)
    assert "missing from the checkpoint" in message
    assert ".model.layers[1].layers[2].weight (float32[4, 32])" in message
    assert "unexpected" not in message or ".model" in message

    class NoKey(eqx.Module):
        model: eqx.Module

    with pytest.raises(ValueError, match=r"unexpected\) \(\d+\):\n(.|\n)*\.key \(key<fry>\[\]\)"):
        solstice.load(tmp_path / "exp", like=NoKey(_exp().model))

    # resuming a fit into a mismatched template says the same
    ckpt = ModelCheckpoint(tmp_path / "ckpts")
    _trainer(max_epochs=1, callbacks=[ckpt]).fit(_exp(width=32), blobs_datamodule())
    with pytest.raises(ValueError, match=r"\.model\.layers\[1\]\.layers\[0\]\.bias: checkpoint"):
        _trainer(max_epochs=2).fit(
            _exp(width=16), blobs_datamodule(), ckpt_path=ckpt.last_model_path
        )


# ---------------------------------------------------------------------- retention
class _Scores(Callback):
    """Sets `val/score` to a chosen sequence at every epoch (before ModelCheckpoint runs)."""

    def __init__(self, values):
        self.values = values

    def provided_metrics(self):
        return ("val/score",)

    def on_validation_end(self, trainer, experiment):
        trainer.log_metrics({"val/score": self.values[trainer.current_epoch]})


def test_top_k_and_last_retention_and_best_resume(tmp_path):
    scores = [0.5, 0.2, 0.9, 0.3, 0.4]
    ckpt = ModelCheckpoint(tmp_path, monitor="val/score", mode="min", save_top_k=2)
    trainer = _trainer(max_epochs=5, callbacks=[ckpt, _Scores(scores)])
    trainer.fit(_exp(), blobs_datamodule())
    # best two: epoch 1 (0.2) and 3 (0.3); plus the most recent (epoch 4)
    assert _checkpoints(tmp_path) == ["epoch=1-step=16", "epoch=3-step=32", "epoch=4-step=40"]
    assert ckpt.best_model_path.endswith("epoch=1-step=16") and ckpt.best_model_score == 0.2
    assert ckpt.kth_value == 0.3 and ckpt.last_model_path.endswith("epoch=4-step=40")
    assert set(ckpt.best_k_models.values()) == {0.2, 0.3}

    # "best" from disk: a new Trainer resumes at the end of epoch 1
    again = ModelCheckpoint(tmp_path, monitor="val/score", mode="min", save_top_k=2)
    resumed = _trainer(max_epochs=2, callbacks=[again, _Scores(scores)])
    with pytest.warns(UserWarning, match=r"limits \(max_epochs=2.*are reached"):
        resumed.fit(_exp(), blobs_datamodule(), ckpt_path="best")  # nothing left to train
    assert resumed.global_step == 16 and resumed.current_epoch == 2

    # without a monitor, save_top_k=1 keeps only the most recent; save_top_k=-1 keeps all
    one = ModelCheckpoint(tmp_path / "one", every_n_train_steps=3, every_n_epochs=None)
    every = ModelCheckpoint(tmp_path / "all", save_top_k=-1)
    _trainer(max_epochs=2, callbacks=[one, every]).fit(_exp(), blobs_datamodule())
    assert _checkpoints(tmp_path / "one") == ["epoch=1-step=15"]
    assert _checkpoints(tmp_path / "all") == ["epoch=0-step=8", "epoch=1-step=16"]
    with pytest.raises(ValueError, match="nothing to rank"):
        ModelCheckpoint(tmp_path, save_top_k=3)


def test_time_trigger_with_injected_clock_and_fast_dev_run(tmp_path):
    now = [0.0]

    class Tick(Callback):
        def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
            now[0] += 10.0

    ckpt = ModelCheckpoint(
        tmp_path, train_time_interval=25, every_n_epochs=None, save_top_k=-1, clock=lambda: now[0]
    )
    _trainer(max_epochs=1, callbacks=[Tick(), ckpt]).fit(_exp(), blobs_datamodule())
    assert _checkpoints(tmp_path) == ["epoch=0-step=3", "epoch=0-step=6"]

    quick = ModelCheckpoint(tmp_path / "dev", every_n_train_steps=1)
    _trainer(fast_dev_run=2, callbacks=[quick]).fit(_exp(), blobs_datamodule())
    assert not (tmp_path / "dev").exists()


def test_missing_monitor_lists_available_metrics(tmp_path):
    ckpt = ModelCheckpoint(tmp_path, monitor="val/acc", mode="max")
    with pytest.raises(
        ValueError, match=r"`val/acc`(.|\n)*`val/accuracy`, `val/balanced_accuracy`"
    ):
        _trainer(max_epochs=1, callbacks=[ckpt]).fit(_exp(), blobs_datamodule())


# ---------------------------------------------------------------------- faults
def test_corrupted_latest_checkpoint_is_reported_and_skipped(tmp_path):
    ckpt = ModelCheckpoint(tmp_path, save_top_k=-1)
    trainer = _trainer(max_epochs=3, callbacks=[ckpt])
    trainer.fit(_exp(), blobs_datamodule())
    names = _checkpoints(tmp_path)
    assert names == ["epoch=0-step=8", "epoch=1-step=16", "epoch=2-step=24"]
    latest = tmp_path / names[-1]
    verify(latest)

    # flip one byte of the largest array file, keeping its size
    data = max(
        (p for p in latest.rglob("*") if p.is_file() and "/d/" in str(p)), key=os.path.getsize
    )
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    before = _tree_digest(latest)
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify(latest)

    resumed = _trainer(max_epochs=3, callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
    with pytest.warns(RuntimeWarning, match=r"Skipping checkpoint .*epoch=2-step=24.*SHA-256"):
        resumed.fit(_exp(), blobs_datamodule(), ckpt_path="last")
    assert resumed.global_step == 24  # resumed from step 16 and trained the last epoch again
    assert _tree_digest(latest) == before  # the damaged checkpoint was left untouched
    assert "epoch=2-step=24-v1" in _checkpoints(tmp_path)  # and not overwritten

    # an explicit path to a damaged checkpoint is refused, never loaded
    with pytest.raises(ValueError, match="Cannot resume"):
        _trainer(max_epochs=3).fit(_exp(), blobs_datamodule(), ckpt_path=latest)

    # truncated metadata, a partial save and an empty directory are never taken for checkpoints
    middle = tmp_path / "epoch=1-step=16"
    text = (middle / "solstice.json").read_text()
    (middle / "solstice.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        verify(middle)
    (tmp_path / "epoch=9-step=99.orbax-checkpoint-tmp").mkdir()
    found = find_last(tmp_path)
    assert found[0].name == "epoch=2-step=24-v1"


def test_failed_save_warns_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    real = orbax_io.write_metadata
    calls = []

    def flaky(directory, metadata):
        calls.append(metadata["progress"]["global_step"])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(directory, metadata)

    monkeypatch.setattr(orbax_io, "write_metadata", flaky)
    ckpt = ModelCheckpoint(tmp_path)  # keeps only the most recent
    trainer = _trainer(max_epochs=3, callbacks=[ckpt])
    with pytest.warns(RuntimeWarning, match=r"could not write .*epoch=1-step=16.*No space left"):
        trainer.fit(_exp(), blobs_datamodule())
    assert trainer.global_step == 24  # training went on
    # the failed save was discarded, its predecessor only went when a later one committed
    assert _checkpoints(tmp_path) == ["epoch=2-step=24"]
    assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))

    # a failure on the first save leaves nothing half-written, the next one succeeds
    calls.clear()
    calls.append(0)
    ckpt2 = ModelCheckpoint(tmp_path / "b")
    with pytest.warns(RuntimeWarning, match="could not write"):
        _trainer(max_epochs=2, callbacks=[ckpt2]).fit(_exp(), blobs_datamodule())
    assert _checkpoints(tmp_path / "b") == ["epoch=1-step=16"]


class _PoisonAt(Callback):
    """Replaces the experiment's weights with NaN before step `step` (a diverging run)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            bad = jax.tree.map(
                lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x,
                eqx.filter(experiment.model, eqx.is_array),
            )
            new = eqx.tree_at(lambda e: e.model, experiment, eqx.combine(bad, experiment.model))
            trainer.replace_experiment(new, by="test")


def test_terminate_on_nan_keeps_last_finite_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(tmp_path, every_n_train_steps=1, every_n_epochs=None)
    trainer = _trainer(
        max_epochs=3,
        log_every_n_steps=4,
        callbacks=[_PoisonAt(6), terminate := solstice.callbacks.TerminateOnNaN(), ckpt],
    )
    with pytest.warns(RuntimeWarning) as record:
        trainer.fit(_exp(), blobs_datamodule())
    messages = [str(w.message) for w in record]
    assert any("not saving at global step 6" in m for m in messages)
    nan_warning = [m for m in messages if "TerminateOnNaN" in m]
    assert len(nan_warning) == 1 and "at training step 6" in nan_warning[0]
    assert "epoch=0-step=5" in nan_warning[0]
    assert terminate.nonfinite_step == 6 and trainer.global_step == 8
    assert trainer.current_epoch == 1 and trainer.stopped["by"] == "TerminateOnNaN"
    assert _checkpoints(tmp_path) == ["epoch=0-step=5"]
    restored = solstice.load(tmp_path / "epoch=0-step=5", like=_exp())
    assert all(
        np.isfinite(np.asarray(x)).all()
        for x in jax.tree.leaves(eqx.filter(restored.model, eqx.is_array))
    )
    # the check is the callback's own in-step state, carried only when it is there
    assert int(trainer.in_step_value(terminate)) == 6
    plain = _trainer(max_epochs=1)
    plain.fit(_exp(), blobs_datamodule())
    with pytest.raises(ValueError, match="not a callback of this Trainer"):
        plain.in_step_value(terminate)


def test_terminate_on_nan_reads_the_device_only_at_log_intervals(monkeypatch):
    from jax._src.array import ArrayImpl

    reads = [0]
    original = ArrayImpl._value

    def counted(array):
        if threading.current_thread() is threading.main_thread():  # loggers read on theirs
            reads[0] += 1
        return original.fget(array)

    class PerStep(Callback):
        def __init__(self):
            self.per_step, self.last = [], 0

        def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
            self.per_step.append(reads[0] - self.last)
            self.last = reads[0]

    probe = PerStep()
    trainer = _trainer(
        max_epochs=1, log_every_n_steps=4, callbacks=[probe, solstice.callbacks.TerminateOnNaN()]
    )
    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    trainer.fit(_exp(), blobs_datamodule())
    # one read of the on-device flag after step 4 (a log interval); none in the other steps
    assert probe.per_step[1:] == [0, 0, 0, 1, 0, 0, 0], probe.per_step


def test_leftovers_of_a_killed_run_are_removed_at_train_start(tmp_path):
    # a save Orbax never finished (killed mid-write) and a checkpoint killed mid-delete
    unfinished = tmp_path / "epoch=0-step=4.orbax-checkpoint-tmp-1700000000"
    deleting = tmp_path / "epoch=0-step=2.solstice-deleting"
    for leftover in (unfinished, deleting):
        leftover.mkdir()
        (leftover / "data").write_bytes(b"partial")
    ckpt = ModelCheckpoint(tmp_path, save_top_k=0, save_last=True)
    _trainer(max_epochs=1, callbacks=[ckpt]).fit(_exp(), blobs_datamodule())
    assert not unfinished.exists() and not deleting.exists()
    assert Path(ckpt.last_model_path).is_dir()
    verify(ckpt.last_model_path)
