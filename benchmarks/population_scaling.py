"""What a `solstice.Population` of N small MLPs costs per training step, N = 1, 8, 32, 100,
against one member alone, side by side.

Each contestant is one running `fit` (see `_fit_gate.EpochGate`) timed per epoch and
interleaved with the others (`_common.run`); no validation, no logging within an epoch. The
members are the vmap ensemble's MLP (64 -> 64 -> 64 -> 10, GELU) as
`ClassificationExperiment`s with Adam, on 8x8-digit-shaped random data, batch 64, every
member on the same batch. Reported: milliseconds per step, and the time per step of each
population against the 1-member population (median over rounds of the per-round ratio of
wall times; per CPU-s: of CPU times), so "N=8: 1.6x" means 8 members cost 1.6 times one.

    python benchmarks/population_scaling.py [--rounds 5] [--sizes 1 8 32 100] [--width 64]
"""

import argparse
import statistics

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Contestant, machine, run
from _fit_gate import EpochGate

import solstice
from solstice.datamodules import ArrayDataModule

ADAM = optax.adam(1e-3)


def member(index: int, width: int) -> solstice.ClassificationExperiment:
    mlp = eqx.nn.MLP(64, 10, width, 2, activation=jax.nn.gelu, key=jax.random.key(index))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    optimizer = solstice.OptaxOptimizer(ADAM, model)
    return solstice.ClassificationExperiment(
        model, optimizer, num_classes=10, key=jax.random.key(10_000 + index)
    )


def contestant(name: str, experiment, args, data) -> Contestant:
    dm = ArrayDataModule(train=data, batch_size=args.batch_size)
    steps = args.samples // args.batch_size
    gate = EpochGate()
    trainer = gate.trainer(steps, devices=1)
    return gate.contestant(name, trainer, experiment, dm, steps * args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 100])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=12_800)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = {
        "image": rng.random((args.samples, 8, 8), dtype=np.float32),
        "label": rng.integers(0, 10, args.samples).astype(np.int32),
    }
    print(f"warming up (compiling) on {machine()}", flush=True)
    steps = args.samples // args.batch_size
    print(f"MLP 64-{args.width}-{args.width}-10, batch {args.batch_size}, {steps} steps per epoch")
    contestants = [contestant("one member alone", member(0, args.width), args, data)]
    for n in args.sizes:
        population = solstice.Population(
            [member(i, args.width) for i in range(n)], member_metrics=("loss",)
        )
        contestants.append(contestant(f"N={n}", population, args, data))
    by = run(contestants, args.rounds)
    one = by[f"N={args.sizes[0]}"]
    print(f"\ntime per step against N={args.sizes[0]} (median over rounds; lower is cheaper):")
    print(f"{'contestant':<18} {'ms/step':>8} {'wall':>7} {'per CPU-s':>10}")
    for c in contestants:
        ms = 1e3 * statistics.median(c.times) / steps
        wall = statistics.median(b / a for a, b in zip(one.rates, c.rates))
        cpu = statistics.median(b / a for a, b in zip(one.cpu, c.cpu))
        print(f"{c.name:<18} {ms:8.3f} {1 / wall:6.2f}x {1 / cpu:9.2f}x")


if __name__ == "__main__":
    main()
