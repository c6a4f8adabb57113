"""Cost of observing a run: NormMonitor, an idle ProfilerCallback, ThroughputMonitor and
DeviceStatsMonitor, each against the same Trainer without them.

    python benchmarks/observe_cost.py [--rounds 7] [--samples 30720] [--small] [--only NAME ...]

Trainers train the same MLP (784-512-512-10, batch 128; `--small`: 784-64-10, batch 32,
where the per-step overhead shows most) on the same MNIST-shaped random data in one
process, logging every 50 steps, no logger, no progress bar. Each is warmed up (compiled,
one epoch), then they run *rounds*: in every round each trains one epoch of its running
`fit` (`EpochGate`), in turn, the one going first rotating. The headline is, for each
contestant, the median over rounds of the per-round ratio of its samples/s to the plain
Trainer's (1.0: free), and the same ratio per CPU second of the process (which other
processes' load on a shared machine disturbs less).

- **NormMonitor**: the global norms of gradients, parameters and updates computed inside
  the compiled step (three more reductions over the parameters per step), logged at each
  interval; `per_module=True` too.
- **profiler idle**: a `ProfilerCallback` whose trace never starts (`start_step` beyond the
  run): what having it in the callbacks costs between traces (its per-batch hook). A
  Trainer without it runs nothing of it: "profiler off" is the plain Trainer.
- **ThroughputMonitor**, **DeviceStatsMonitor**: host work at log intervals only.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Contestant, cpu_ratio, interleave, machine, spread
from _fit_gate import EpochGate

import solstice
from solstice.callbacks import (
    DeviceStatsMonitor,
    NormMonitor,
    ProfilerCallback,
    ThroughputMonitor,
)
from solstice.datamodules import ArrayDataModule


def make_experiment(width: int, depth: int):
    key_model, key_exp = jax.random.split(jax.random.key(0))
    model = eqx.nn.MLP(784, 10, width, depth, key=key_model)
    return solstice.ClassificationExperiment(
        model,
        solstice.OptaxOptimizer(optax.adam(1e-3), model),
        10,
        key=key_exp,
        input_key="image",
    )


def contestant(name: str, datamodule, callbacks, width: int, depth: int) -> Contestant:
    gate = EpochGate()
    trainer = solstice.Trainer(
        max_epochs=10**6,
        devices=1,
        loggers=[],
        log_every_n_steps=50,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, gate],
    )
    steps = datamodule.splits["train"]["label"].shape[0] // datamodule.batch_size
    c = gate.contestant(
        name, trainer, make_experiment(width, depth), datamodule, steps * datamodule.batch_size
    )
    c.trainer = trainer
    c.close = gate.close
    return c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7, help="rounds (one epoch each)")
    parser.add_argument("--samples", type=int, default=30720, help="samples per epoch")
    parser.add_argument("--small", action="store_true", help="MLP 784-64-10, batch 32")
    parser.add_argument(
        "--only", nargs="*", default=None, help="contestants to run besides plain (by name)"
    )
    args = parser.parse_args()
    print(machine())
    width, depth, batch = (64, 1, 32) if args.small else (512, 2, 128)
    rng = np.random.default_rng(0)
    data = {
        "image": rng.random((args.samples, 784), dtype=np.float32),
        "label": rng.integers(0, 10, args.samples).astype(np.int32),
    }
    dm = ArrayDataModule(train=data, batch_size=batch)
    with tempfile.TemporaryDirectory() as tmp:
        setups = {
            "plain": [],
            "NormMonitor": [NormMonitor()],
            "NormMonitor(per_module)": [NormMonitor(per_module=True)],
            "profiler idle": [ProfilerCallback(tmp, start_step=10**9)],
            "ThroughputMonitor": [ThroughputMonitor()],
            "DeviceStatsMonitor": [DeviceStatsMonitor()],
        }
        names = [n for n in setups if args.only is None or n == "plain" or n in args.only]
        contestants = [contestant(n, dm, setups[n], width, depth) for n in names]
        try:
            interleave(contestants, args.rounds, verbose=False)
        finally:
            for c in contestants:
                c.close()
                c.trainer.close()
    plain = contestants[0]
    print(f"MLP 784-{width}x{depth}-10, batch {batch}, {args.samples} samples per epoch")
    for c in contestants:
        line = f"{c.name:26s} {statistics.median(c.rates):9.0f} samples/s"
        if c is not plain:
            per_round = [x / y for x, y in zip(c.rates, plain.rates)]
            lo, hi = spread(c, plain)
            line += (
                f"  ratio to plain {statistics.median(per_round):.3f} "
                f"(median of {args.rounds}, range {lo:.3f}-{hi:.3f}); per CPU-s "
                f"{cpu_ratio(c, plain):.3f}"
            )
        print(line, flush=True)
    print("XLA's cost analysis of each compiled step (trainer.train_step_cost()):")
    for c in contestants:
        cost = c.trainer.train_step_cost()
        print(f"{c.name:26s} {cost.flops / 1e6:9.2f} MFLOP {cost.bytes_accessed / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
