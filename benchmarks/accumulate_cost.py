"""What microbatching costs: `accumulate_grad_batches=4` on batches of B, against one batch
of 4B and against plain steps on batches of B, timed side by side (`_common.interleave`).

All three see the same samples per epoch. The K=4 run takes a quarter of the optimizer
steps of the B run, each a compiled scan over 4 microbatches (memory of one batch of B);
the 4B run takes the same optimizer steps on one big batch (memory of 4B). Per-sample speed
ratios against each:

- **K=4 x B / 4B**: what scanning microbatches costs against a batch that fits (the price of
  the memory saved: smaller matrix products, a scan, the gradient sums);
- **K=4 x B / K=1 x B**: against stepping on every batch of B (a quarter of the optimizer
  updates and host dispatches).

    python benchmarks/accumulate_cost.py [--rounds 5] [--samples 16384] [--batch-size 32]
"""

import argparse

from _common import Contestant, cpu_ratio, machine, mnist_like, ratio, run, spread
from _fit_gate import EpochGate
from _mlp import make_experiment

from solstice.datamodules import ArrayDataModule

HIDDEN = [512, 512]


def fit(x, y, batch_size: int, accumulate: int, name: str) -> Contestant:
    """`Trainer.fit` with `accumulate_grad_batches=accumulate`, timed per epoch."""
    dm = ArrayDataModule(train={"image": x, "label": y}, batch_size=batch_size)
    batches = len(x) // batch_size
    steps = batches // accumulate
    gate = EpochGate()
    trainer = gate.trainer(steps, accumulate_grad_batches=accumulate, compilation_cache=False)
    contestant = gate.contestant(name, trainer, make_experiment(HIDDEN), dm, batches * batch_size)
    return contestant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(machine())
    b = args.batch_size
    x, y = mnist_like(args.samples)
    print(f"{args.samples} samples, MLP 784-512-512-10, Adam; B={b}")
    contestants = [
        fit(x, y, b, 4, f"K=4 x B={b}"),
        fit(x, y, 4 * b, 1, f"one batch 4B={4 * b}"),
        fit(x, y, b, 1, f"K=1 x B={b}"),
    ]
    by = run(contestants, args.rounds)
    micro = by[f"K=4 x B={b}"]
    for other in (f"one batch 4B={4 * b}", f"K=1 x B={b}"):
        lo, hi = spread(micro, by[other])
        print(
            f"K=4 x B / {other}: samples/s {ratio(micro, by[other]):.3f} ({lo:.3f}-{hi:.3f}), "
            f"per CPU-s {cpu_ratio(micro, by[other]):.3f}"
        )


if __name__ == "__main__":
    main()
