"""What exactly-once evaluation costs: a short last batch run at its own size, against padded.

Every evaluation sample counts once. An experiment that honours the mask
(`ClassificationExperiment`) gets the short last batch padded and masked: one compiled step.
Any other experiment gets it at its own size, in a step compiled for it. This measures, on
the same model and data:

- **first validate**: a new Trainer's first `validate` (compiling included): the own-size path
  compiles one more function, which is its whole extra cost;
- **warm validate**: later `validate` calls, every function compiled: the short batch runs
  at its own size instead of padded, which costs nothing measurable;

each against the same split cut to a multiple of the batch size (no short batch), timed side
by side (`_common.interleave`).

    python benchmarks/eval_cost.py [--rounds 7] [--samples 10000]
"""

import argparse
import time
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import Contestant, machine, mnist_like, ratio, run, spread

import solstice
from solstice.datamodules import ArrayDataModule


class OwnSize(solstice.ClassificationExperiment):
    """The same experiment, declaring that it does not read the mask: its short last batch
    runs at its own size."""

    honours_mask: ClassVar[bool] = False


def experiment(cls):
    mlp = eqx.nn.MLP(784, 10, 512, 2, key=jax.random.key(0))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    return cls(model, solstice.OptaxOptimizer(optax.adam(1e-3), model), num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    print(machine())
    batch = args.batch_size
    n = args.samples - args.samples % batch + batch // 2 + 1  # a short last batch
    x, y = mnist_like(n)
    splits = {
        "short last batch": {"image": x, "label": y},
        "whole batches": {"image": x[: n - n % batch], "label": y[: n - n % batch]},
    }
    print(f"{n} samples in batches of {batch} (last {n % batch}); MLP 784-512-512-10")

    def contestant(name: str, cls, split: str, warm: bool) -> Contestant:
        dm = ArrayDataModule(val=splits[split], batch_size=batch)
        exp = experiment(cls)
        samples = len(splits[split]["label"])
        trainer = solstice.Trainer(enable_progress_bar=False, compilation_cache=False)
        if warm:
            trainer.validate(exp, dm)

        def epoch():
            nonlocal trainer
            if not warm:  # a new Trainer: every function compiled again
                jax.clear_caches()
                trainer = solstice.Trainer(enable_progress_bar=False, compilation_cache=False)
            start, cpu = time.perf_counter(), time.process_time()
            trainer.validate(exp, dm)
            return time.perf_counter() - start, samples, time.process_time() - cpu

        return Contestant(name, epoch)

    for warm in (True, False):
        title = "warm validate" if warm else "first validate (compiling)"
        print(f"\n== {title}")
        contestants = [
            contestant(f"{kind}, {split}", cls, split, warm)
            for kind, cls in (("padded", solstice.ClassificationExperiment), ("own size", OwnSize))
            for split in splits
        ]
        results = run(contestants, args.rounds)
        for kind in ("padded", "own size"):
            a, b = results[f"{kind}, short last batch"], results[f"{kind}, whole batches"]
            lo, hi = spread(a, b)
            print(f"{title}: {kind}: short/whole samples/s {ratio(a, b):.3f} ({lo:.3f}-{hi:.3f})")
        a, b = results["own size, short last batch"], results["padded, short last batch"]
        lo, hi = spread(a, b)
        print(
            f"{title}: own size / padded, short last batch: {ratio(a, b):.3f} ({lo:.3f}-{hi:.3f})"
        )


if __name__ == "__main__":
    main()
