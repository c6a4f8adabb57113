"""Quickstart: train an MLP on real handwritten digits, then test it.

Runs offline in well under a minute on a laptop CPU:

    python examples/quickstart.py

scikit-learn's bundled digits (1,797 real 8x8 images) stand in for MNIST so that nothing
needs downloading; swap `Digits(...)` for `MNIST("data", ...)` to train on MNIST.
"""

import argparse
import logging
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import solstice
from solstice.datamodules import Digits


def make_model(key: jax.Array) -> eqx.Module:
    """An MLP over the flattened 8x8 image: 64 -> 128 -> 128 -> 10 logits."""
    mlp = eqx.nn.MLP(64, 10, width_size=128, depth=2, activation=jax.nn.gelu, key=key)
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("solstice").setLevel(logging.INFO)  # Solstice's logs, not JAX's

    start = time.perf_counter()
    model_key, experiment_key = jax.random.split(jax.random.key(args.seed))
    model = make_model(model_key)
    experiment = solstice.ClassificationExperiment(
        model,
        solstice.OptaxOptimizer(optax.adamw(args.lr, weight_decay=1e-4), model),
        num_classes=10,
        key=experiment_key,
    )
    datamodule = Digits(batch_size=args.batch_size, eval_batch_size=256, seed=args.seed)
    trainer = solstice.Trainer(
        max_epochs=args.epochs,
        loggers=[solstice.PythonLogger()],
        log_every_n_steps=20,
        devices=1,
        seed=args.seed,
        enable_progress_bar=not args.no_progress_bar,
    )
    experiment = trainer.fit(experiment, datamodule)
    metrics = trainer.test(experiment, datamodule)
    trainer.close()

    print(f"\nTest metrics after {args.epochs} epochs ({time.perf_counter() - start:.1f} s):")
    for name, value in sorted(metrics.items()):
        print(f"  {name:<28} {value:.4f}")
    return metrics


if __name__ == "__main__":
    main()
