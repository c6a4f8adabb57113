"""Cost of logging every step: TensorBoard + CSV + progress bar against no logging.

    python benchmarks/bench_logging.py [--repeats 10] [--samples 61440]

Two Trainers train the same MLP (784-512-512-10, batch 128) on the same MNIST-shaped random
data in one process: one without logging (`loggers=[]`, no progress bar, one log per epoch),
one logging every step (`log_every_n_steps=1`) to TensorBoard and CSV with the progress bar
on. Each is warmed up (compiled, one epoch), then they run *rounds*: in every round each
trains one more epoch (`fit` with `max_epochs` raised by one), in turn, the one going first
alternating. An epoch is timed from its start to the end of its training, after waiting for
the device and for the logging thread to have written everything (`flush`), so work left
queued counts. The headline is the median over rounds of the per-round ratio logged/silent
(samples/s); target >= 0.95, i.e. logging costs at most 5%. Also printed: best/best, the
ratio per CPU second (which other processes' load disturbs less), and the extra CPU time per
step that logging costs (all threads of the process).
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Contestant,
    best_ratio,
    cpu_ratio,
    interleave,
    machine,
    ratio,
    spread,
)
from _fit_gate import EpochGate

import solstice
from solstice.datamodules import ArrayDataModule


def make_experiment():
    key_model, key_exp = jax.random.split(jax.random.key(0))
    model = eqx.nn.MLP(784, 10, 512, 2, key=key_model)
    return solstice.ClassificationExperiment(
        model,
        solstice.OptaxOptimizer(optax.adam(1e-3), model),
        10,
        key=key_exp,
        input_key="image",
    )


class _EpochTimer(EpochGate):
    """An `EpochGate` whose epochs also wait for the logging thread's drain at their end."""

    def on_train_epoch_end(self, trainer, experiment):
        trainer.flush_logs()
        super().on_train_epoch_end(trainer, experiment)


def contestant(name: str, datamodule, **trainer_kw) -> Contestant:
    gate = _EpochTimer()
    trainer = solstice.Trainer(max_epochs=10**6, devices=1, **trainer_kw)
    trainer.callbacks.append(gate)  # last: after the progress bar and the logging callback
    samples = (datamodule.splits["train"]["label"].shape[0] // datamodule.batch_size) * (
        datamodule.batch_size
    )
    c = gate.contestant(name, trainer, make_experiment(), datamodule, samples)
    c.trainer = trainer
    c.close = gate.close
    return c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10, help="rounds (one epoch each)")
    parser.add_argument("--samples", type=int, default=61440, help="samples per epoch")
    args = parser.parse_args()
    print(machine())
    rng = np.random.default_rng(0)
    data = {
        "image": rng.random((args.samples, 784), dtype=np.float32),
        "label": rng.integers(0, 10, args.samples).astype(np.int32),
    }
    dm = ArrayDataModule(train=data, batch_size=128)
    with tempfile.TemporaryDirectory() as tmp:
        silent = contestant(
            "no logging", dm, loggers=[], log_every_n_steps=10**9, enable_progress_bar=False
        )
        logged = contestant(
            "log every step (TB+CSV+bar)",
            dm,
            loggers=[solstice.TensorBoardLogger(tmp), solstice.CSVLogger(tmp)],
            log_every_n_steps=1,
            enable_progress_bar=True,
        )
        interleave([silent, logged], args.repeats, verbose=False)
        for c in (silent, logged):
            c.close()
            c.trainer.close()
    for c in (silent, logged):
        rates = ", ".join(f"{x:.0f}" for x in c.rates)
        print(f"{c.name:28s} {statistics.median(c.rates):8.0f} samples/s  (rounds: {rates})")
    lo, hi = spread(logged, silent)
    batch = dm.batch_size
    cpu_cost = statistics.median(
        (1 / lg - 1 / s) * batch for lg, s in zip(logged.cpu, silent.cpu)
    )  # CPU seconds per step, all threads
    print(
        f"best/best {best_ratio(logged, silent):.3f}, per CPU-s {cpu_ratio(logged, silent):.3f}, "
        f"extra CPU per step {1e6 * cpu_cost:.0f} us (median over rounds)"
    )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.1f}")
    print(
        f"ratio logged/silent: {ratio(logged, silent):.3f}  (median of {args.repeats} rounds, "
        f"range {lo:.3f}-{hi:.3f}; target >= 0.95)"
    )


if __name__ == "__main__":
    main()
