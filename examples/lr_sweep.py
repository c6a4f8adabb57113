"""A learning-rate sweep in one run: 8 learning rates, 8 members of one `solstice.Population`.

Each member is the same MLP (same initialisation, so only the rate differs) trained with
Adam; the rate lives in the optimizer state (`optax.inject_hyperparams`), so the members
share one structure and train as one vmapped program through the ordinary Trainer. Per-member
early stopping stops a member whose validation loss stalls, and a `PopulationCheckpoint`
keeps each member's best weights. On real 8x8 digits, offline:

    python examples/lr_sweep.py                  # 8 rates from 1e-4 to 1e-1, 20 epochs
    python examples/lr_sweep.py --smoke          # a few steps (CI)

See `docs/population.md`.
"""

import argparse
import logging
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import solstice
from solstice.callbacks import PopulationCheckpoint, PopulationEarlyStopping
from solstice.datamodules import Digits

#: One transformation for every member: the rate is set per member in its state.
ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def make_member(index: int, lr: float, width: int = 64, seed: int = 0):
    """Member `index`: the seed's MLP, trained with Adam at `lr`."""
    mlp = eqx.nn.MLP(64, 10, width, 2, activation=jax.nn.gelu, key=jax.random.key(seed))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    optimizer = solstice.OptaxOptimizer(ADAM, model).with_learning_rate(lr)
    return solstice.ClassificationExperiment(model, optimizer, num_classes=10)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the sweep; print each rate's best validation loss and accuracy and the best
    rate. Returns the final `val/...` metrics and `best_lr`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_steps = 1, 4
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every read

    rates = np.geomspace(1e-4, 1e-1, 8).tolist()
    population = solstice.Population.build(
        lambda i, lr: make_member(i, lr, args.width, args.seed),
        lr=rates,
        member_metrics=("loss", "accuracy"),
    )
    with tempfile.TemporaryDirectory() as tmp:
        stopping = PopulationEarlyStopping("val/loss", patience=args.patience)
        best = PopulationCheckpoint(tmp, monitor="val/loss")
        trainer = solstice.Trainer(
            max_epochs=args.epochs,
            max_steps=args.max_steps,
            log_every_n_steps=2 if args.smoke else 20,
            callbacks=[stopping, best],
            devices=1,
            seed=args.seed,
            enable_progress_bar=False,
        )
        trainer.fit(population, Digits(batch_size=args.batch_size, seed=args.seed))
        trainer.close()
        # every member's best weights are on disk: reload the winner as a plain experiment
        winner = int(np.argmin(best.best_scores))
        model = solstice.load(best.best_paths[winner], like=make_member(winner, rates[winner]))
    assert isinstance(model, solstice.ClassificationExperiment)

    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(f"\n{'learning rate':>14} {'best val loss':>14} {'at epoch':>9} {'val acc':>8} stopped")
    for i, lr in enumerate(population.hparams["lr"]):
        stopped = stopping.stopped_epochs[i]
        print(
            f"{lr:>14.2e} {best.best_scores[i]:>14.4f} {best.best_epochs[i]!s:>9} "
            f"{metrics[f'val/member_{i}/accuracy']:>8.4f} "
            f"{'-' if stopped is None else f'epoch {stopped}'}"
        )
    print(f"best learning rate: {rates[winner]:.2e}")
    metrics["best_lr"] = rates[winner]
    return metrics


if __name__ == "__main__":
    main()
