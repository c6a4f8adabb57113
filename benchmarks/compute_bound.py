"""Compute-bound benchmark: MLP 784-512-512-10, batch 128, 60k MNIST-shaped samples.

    python benchmarks/compute_bound.py            # about 5 minutes on 2 CPU cores
    python benchmarks/compute_bound.py --precision bf16-mixed   # also a bf16-mixed fit

Solstice `fit` against the limit (its own compiled step on a batch already on the device),
a hand-written Equinox loop, Keras 3 `fit` (JAX backend) and Lightning (CPU torch), one epoch
each per round, interleaved; ratios are medians over rounds of per-round speed ratios.
Targets (issue 6): fit >= 0.97x the limit, >= 1.0x Keras, >= 2x Lightning.
"""

from _common import run
from _mlp import build, parse, ratio_line


def main() -> None:
    args = parse(__doc__.splitlines()[0], hidden=[512, 512], batch_size=128, rounds=5)
    contestants, notes = build(args, fused=None, include_defaults=True)
    by = run(contestants, args.rounds)
    fit = "solstice fit"
    print("\nratios (speed, higher is faster; median over rounds):")
    for line in (
        ratio_line(by, fit, "limit", 0.97),
        ratio_line(by, fit, "keras fit (jax)", 1.0),
        ratio_line(by, fit, "lightning (cpu torch)", 2.0),
        ratio_line(by, fit, "naive eqx loop"),
        ratio_line(by, "solstice fit (on_device)", "limit"),
        ratio_line(by, "limit (fresh batches)", "limit"),
        ratio_line(by, "solstice fit (fit per epoch)", "limit"),
        ratio_line(by, "solstice fit (defaults)", fit),
        *([ratio_line(by, f"{fit} ({args.precision})", fit)] if args.precision else []),
        *notes,
    ):
        print(line)


if __name__ == "__main__":
    main()
