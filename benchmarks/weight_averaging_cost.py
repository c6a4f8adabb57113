"""What weight averaging costs: training epochs with `EMAWeightAveraging` (and
`StochasticWeightAveraging` from its first step) against the same fit without, side by side.

The average is updated inside the compiled step (one multiply-add, or a running mean, per
averaged weight per step, in float32), so its cost is the extra memory traffic over the
weights each step. Each contestant is one running `fit` (see `_fit_gate.EpochGate`), timed
per epoch, interleaved with the others (`_common.run`); no validation, no logging within an
epoch. Defaults: the overhead-bound MLP 784-64-10, batch 32 (`--hidden 512 512 --batch-size
128`: the compute-bound one).

    python benchmarks/weight_averaging_cost.py [--rounds 7] [--hidden 64] [--batch-size 32]
"""

import argparse

from _common import Contestant, machine, mnist_like, run
from _fit_gate import EpochGate
from _mlp import make_experiment, ratio_line

from solstice.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging
from solstice.datamodules import ArrayDataModule


def fit_with(name: str, averaging: Callback | None, args, x, y) -> Contestant:
    dm = ArrayDataModule(train={"image": x, "label": y}, batch_size=args.batch_size)
    n_steps = len(x) // args.batch_size
    gate = EpochGate()
    trainer = gate.trainer(n_steps, callbacks=[] if averaging is None else [averaging])
    contestant = gate.contestant(
        name, trainer, make_experiment(args.hidden), dm, n_steps * args.batch_size
    )
    return contestant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    x, y = mnist_like(args.samples)
    print(f"warming up (compiling) on {machine()}", flush=True)
    sizes = "-".join(str(h) for h in [784, *args.hidden, 10])
    print(f"MLP {sizes}, batch {args.batch_size}, {len(x) // args.batch_size} steps per epoch")
    contestants = [
        fit_with("fit", None, args, x, y),
        fit_with("fit + EMA", EMAWeightAveraging(0.999), args, x, y),
        fit_with("fit + SWA", StochasticWeightAveraging(0), args, x, y),
    ]
    by = run(contestants, args.rounds)
    print("\nratios (speed, higher is faster; median over rounds):")
    print(ratio_line(by, "fit + EMA", "fit"))
    print(ratio_line(by, "fit + SWA", "fit"))


if __name__ == "__main__":
    main()
