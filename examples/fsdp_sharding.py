"""Split the experiment's large arrays over the devices (FSDP) with `sharding_rules`.

An MLP on the real 8x8 digits is trained twice on 4 devices: replicated (data parallel, every
device holds everything) and with `solstice.FullySharded`, which splits every array of at
least `--min-size` elements along its largest evenly divisible axis, parameters and Adam's
moments alike. The two runs give the same accuracy; the sharded one keeps a quarter of each
large array per device. Runs offline on CPU, where the 4 devices are forced:

    python examples/fsdp_sharding.py
    python examples/fsdp_sharding.py --width 512 --epochs 3

See docs/scaling.md ("Sharding the experiment").
"""

import argparse
import os

# 4 CPU devices, before JAX starts (a GPU/TPU host uses its real devices instead).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import solstice  # noqa: E402
from solstice.datamodules import Digits  # noqa: E402


def make_experiment(width: int, seed: int = 0) -> solstice.ClassificationExperiment:
    mlp = eqx.nn.MLP(64, 10, width, 2, activation=jax.nn.relu, key=jax.random.key(seed))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(1e-3), model), num_classes=10
    )


def train(width: int, epochs: int, rules: list) -> tuple[solstice.Trainer, dict[str, float]]:
    trainer = solstice.Trainer(
        max_epochs=epochs, devices=4, enable_progress_bar=False, sharding_rules=rules
    )
    data = Digits(batch_size=64, eval_batch_size=256)
    experiment = trainer.fit(make_experiment(width), data)
    return trainer, trainer.test(experiment, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=2**12)
    args = parser.parse_args()
    if jax.device_count() < 4:
        raise SystemExit(
            f"This example needs 4 devices, found {jax.device_count()}; on CPU run it in a "
            "fresh process (it sets XLA_FLAGS=--xla_force_host_platform_device_count=4)."
        )

    _, replicated = train(args.width, args.epochs, rules=[])
    trainer, sharded = train(args.width, args.epochs, [solstice.FullySharded(args.min_size)])
    print(trainer.describe_shardings())
    for key in ("test/accuracy", "test/loss"):
        print(f"{key}: replicated {replicated[key]:.4f}, sharded {sharded[key]:.4f}")
    np.testing.assert_allclose(sharded["test/accuracy"], replicated["test/accuracy"], atol=0.01)


if __name__ == "__main__":
    main()
