"""Overhead-bound benchmark: MLP 784-64-10, batch 32, 60k MNIST-shaped samples.

    python benchmarks/overhead_bound.py           # about 3 minutes on 2 CPU cores

Here a step is so short that the Python around it decides the speed. Solstice `fit` with
one step per call and with 10 fused steps per call (`steps_per_execution=10`) against the
limit (its own compiled single step in a bare loop on a batch already on the device), with
the naive loop and the peers for context. Targets (issue 6): fit >= 0.9x the limit at K=1,
fit K=10 >= 1.5x the limit.
"""

from _common import run
from _mlp import build, parse, ratio_line

K = 10


def main() -> None:
    args = parse(__doc__.splitlines()[0], hidden=[64], batch_size=32, rounds=7)
    contestants, notes = build(args, fused=K, include_defaults=True)
    by = run(contestants, args.rounds)
    fit = "solstice fit"
    print("\nratios (speed, higher is faster; median over rounds):")
    for line in (
        ratio_line(by, fit, "limit", 0.9),
        ratio_line(by, f"{fit} K={K}", "limit", 1.5),
        ratio_line(by, f"{fit} (on_device) K={K}", "limit", 1.5),
        ratio_line(by, f"{fit} (on_device) K={K} (fit per epoch)", "limit", 1.5),
        ratio_line(by, f"{fit} K={K}", f"limit K={K}"),
        ratio_line(by, f"{fit} (on_device) K={K}", f"limit K={K}"),
        ratio_line(by, f"limit K={K}", "limit"),
        ratio_line(by, f"{fit} (on_device) K={K}", f"limit K={K} (fresh batches)"),
        ratio_line(by, f"limit K={K} (fresh batches)", f"limit K={K}"),
        ratio_line(by, "limit (fresh batches)", "limit"),
        ratio_line(by, "solstice fit (on_device)", "limit"),
        ratio_line(by, "solstice fit (defaults)", fit),
        ratio_line(by, fit, "naive eqx loop"),
        ratio_line(by, fit, "keras fit (jax)"),
        ratio_line(by, f"{fit} K={K}", "keras fit (jax)"),
        ratio_line(by, fit, "lightning (cpu torch)"),
        *notes,
    ):
        print(line)


if __name__ == "__main__":
    main()
