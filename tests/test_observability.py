"""Observability: ModelSummary, Timer, the recompilation warning,
hyperparameters, `trainer.log_metrics` and `trainer.history`."""

import logging
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, ModelSummary, Timer
from solstice.datamodules import DataModule


def _trainer(**kw):
    kw.setdefault("enable_progress_bar", False)
    kw.setdefault("devices", 1)
    kw.setdefault("max_epochs", 2)
    return solstice.Trainer(**kw)


def test_model_summary_counts_parameters(caplog):
    summary = ModelSummary(max_depth=3)
    exp = make_mlp_experiment(in_size=8, num_classes=4, width=32)
    with caplog.at_level(logging.INFO, logger="solstice"):
        _trainer(max_epochs=1, callbacks=[summary]).fit(exp, blobs_datamodule())
    assert summary.total_params == 8 * 32 + 32 + 32 * 4 + 4
    assert summary.total_bytes > 3 * summary.total_params * 4  # params + adam's two moments
    assert "model.layers[1]" in summary.table and "MLP" in summary.table
    assert "Model parameters: 420" in caplog.text


def test_timer_reports_throughput_and_compile_time_apart():
    timer = Timer()
    trainer = _trainer(
        max_epochs=3, log_every_n_steps=4, callbacks=[timer], compilation_cache=False
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4, seed=123), blobs_datamodule())
    trainer.flush_logs()
    history = trainer.history.metrics
    assert len(history["time/steps_per_sec"]) == 6 and min(history["time/steps_per_sec"]) > 0
    ratio = np.array(history["time/samples_per_sec"]) / np.array(history["time/steps_per_sec"])
    np.testing.assert_allclose(ratio, 32)
    assert timer.compile_stats.compilations >= 2  # train step and eval step at least
    assert timer.compile_stats.total_secs > 0
    assert history["compile/total_secs"][-1] == pytest.approx(
        timer.compile_stats.total_secs, rel=0.5
    )
    assert timer.steady_steps_per_sec > 0 and timer.steady_samples_per_sec == pytest.approx(
        32 * timer.steady_steps_per_sec
    )
    assert len(history["time/epoch_secs"]) == 3


def test_recompilation_warning_names_the_changed_argument():
    class Shrinking(DataModule):
        def train_dataloader(self):
            rng = np.random.default_rng(self.epoch)
            size = 32 if self.epoch == 0 else 16  # a new shape in epoch 1
            for _ in range(2):
                yield {
                    "image": rng.normal(size=(size, 8)).astype(np.float32),
                    "label": rng.integers(0, 4, size).astype(np.int32),
                }

    with pytest.warns(
        RuntimeWarning,
        match=r"train step was traced again.*\['image'\].*float32\[32, 8\] -> float32\[16, 8\]",
    ):
        _trainer(max_epochs=3).fit(make_mlp_experiment(in_size=8, num_classes=4), Shrinking())


def test_log_metrics_and_hyperparameters_reach_loggers(tmp_path):
    class Norms(Callback):
        def on_train_epoch_end(self, trainer, experiment):
            leaves = jax.tree.leaves(eqx.filter(experiment.model, eqx.is_array))
            trainer.log_metrics({"weights/norm": optax.tree.norm(leaves)})

    trainer = _trainer(callbacks=[Norms()], loggers=[solstice.CSVLogger(tmp_path)])
    exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    trainer.close()
    norms = trainer.history.metrics["weights/norm"]
    assert trainer.history.steps["weights/norm"] == [8, 16] and trainer.history.epochs[
        "weights/norm"
    ] == [0, 1]
    expected = float(optax.tree.norm(jax.tree.leaves(eqx.filter(exp.model, eqx.is_array))))
    assert norms[-1] == pytest.approx(expected, rel=1e-5)
    assert trainer.history.hparams["num_classes"] == 4
    assert trainer.history.hparams["trainer.max_epochs"] == 2
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["step", "epoch"] and "weights/norm" in header and "val/accuracy" in header
    with pytest.raises(ValueError, match="shape"):
        trainer.log_metrics({"bad": jnp.ones(3)})


def test_history_plot_writes_png(tmp_path):
    trainer = _trainer(log_every_n_steps=2)
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    trainer.flush_logs()
    path = trainer.history.plot(tmp_path / "curves.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
