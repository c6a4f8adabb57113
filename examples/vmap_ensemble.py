"""Train an ensemble of small networks at once, on one device, with `solstice.Population`.

Every member is the same small MLP, a `ClassificationExperiment` with its own initialisation,
dropout key and optimizer state. `solstice.Population` stacks them (each array gains a leading
member axis) and trains all of them with one `eqx.filter_vmap`-ed step on the same batch (or,
with `--bootstrap`, each on its own resample of it): one compiled call, one dispatch, one set
of (batched) matrix multiplies, instead of one per member. The Trainer is the ordinary one.
Inspired by Will Whitney's "Parallelizing neural networks on one GPU with JAX"
(https://willwhitney.com/parallel-training-jax.html). On real 8x8 digits, offline:

    python examples/vmap_ensemble.py                 # 8 members, then the timing comparison
    python examples/vmap_ensemble.py --members 16 --no-timing
    python examples/vmap_ensemble.py --bootstrap     # bagging: a per-member resample
    python examples/vmap_ensemble.py --smoke         # a few steps (CI)

Metrics come per member (`val/member_3/accuracy`), summarised over the members
(`val/population/mean/accuracy`), and for the ensemble, whose prediction is the members'
averaged probabilities (`val/accuracy`). See `docs/examples/vmap_ensemble.md`.
"""

import argparse
import logging
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import solstice
from solstice.callbacks import Timer
from solstice.datamodules import Digits

#: The per-member metrics reported under `member_{i}/...`.
MEMBER_KEYS = ("accuracy", "loss")


def make_member(key: jax.Array, width: int = 64) -> eqx.Module:
    """One member's model: an MLP over the flattened 8x8 image, 64 -> width -> width -> 10."""
    mlp = eqx.nn.MLP(64, 10, width_size=width, depth=2, activation=jax.nn.gelu, key=key)
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])


def make_experiment(index: int, lr: float = 3e-3, width: int = 64, seed: int = 0):
    """Member `index`: its model and dropout key from `jr.split(jr.key(seed), ...)[index]`."""
    model_key, key = jr.split(jr.fold_in(jr.key(seed), index))
    model = make_member(model_key, width)
    optimizer = solstice.OptaxOptimizer(optax.adamw(lr, weight_decay=1e-4), model)
    return solstice.ClassificationExperiment(model, optimizer, num_classes=10, key=key)


# --------------------------------------------------------------------------- the ensemble
class EnsembleMetrics(solstice.Metrics):
    """The members' `PopulationMetrics` and the `ClassificationMetrics` of the ensemble's
    prediction (the mean of the members' probabilities).

    `compute()` returns the ensemble's full battery (`accuracy`, `loss`, `f1_macro`, ...),
    and the members' (`member_{i}/accuracy`, `member_{i}/loss`, `population/mean/accuracy`,
    ...).

    **Arguments:**

    - `members`: the members' metrics (what `Population.eval_step` returns).
    - `probs`: the members' class probabilities, shape `(batch, members, classes)`.
    - `labels`: integer labels, shape `(batch,)`.
    - `mask`: optional boolean `(batch,)`, false on padding.
    """

    members: solstice.PopulationMetrics
    ensemble: solstice.ClassificationMetrics

    def __init__(self, members, probs, labels, mask=None):
        self.members = members
        log_probs = jnp.log(jnp.mean(probs, axis=1))
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        self.ensemble = solstice.ClassificationMetrics(
            logits=log_probs, labels=labels, loss=nll, mask=mask, num_classes=probs.shape[-1]
        )

    def merge(self, other):
        return eqx.tree_at(
            lambda m: (m.members, m.ensemble),
            self,
            (self.members.merge(other.members), self.ensemble.merge(other.ensemble)),
        )

    def compute(self) -> dict[str, Any]:
        return {**self.ensemble.compute(), **self.members.compute()}


class Ensemble(solstice.Population):
    """A `Population` whose evaluation also scores the ensemble's averaged prediction."""

    def eval_step(self, batch):
        probs = self.predict_step(batch)  # (batch, members, classes)
        return EnsembleMetrics(super().eval_step(batch), probs, batch["label"], batch.get("mask"))


def make_ensemble(num_members: int, args: argparse.Namespace) -> Ensemble:
    """`num_members` MLPs of width `args.width`, each trained with AdamW."""
    return Ensemble(
        [make_experiment(i, args.lr, args.width, args.seed) for i in range(num_members)],
        data="bootstrap" if args.bootstrap else "shared",
        seed=args.seed,
        member_metrics=MEMBER_KEYS,
    )


# --------------------------------------------------------------------------- running it
def seconds_per_step(experiment: solstice.Experiment, args: argparse.Namespace) -> float:
    """Steady-state seconds per training step through the Trainer (compile time excluded)."""
    timer = Timer()
    trainer = solstice.Trainer(
        max_steps=args.timing_steps,
        log_every_n_steps=10,
        limit_val_batches=0,
        callbacks=[timer],
        devices=1,
        seed=args.seed,
        enable_progress_bar=False,
    )
    trainer.fit(experiment, Digits(batch_size=args.batch_size, seed=args.seed))
    trainer.close()
    return 1.0 / timer.steady_steps_per_sec


def timing(args: argparse.Namespace) -> dict[str, float]:
    """One plain model, a 1-member and an `args.members`-member ensemble, side by side."""
    candidates = {
        "single": lambda: make_experiment(0, args.lr, args.width, args.seed),
        "1_member": lambda: make_ensemble(1, args),
        f"{args.members}_members": lambda: make_ensemble(args.members, args),
    }
    # Alternate the candidates so that background load hits all alike; the fastest repeat
    # of each counts. The Timer leaves compilation out.
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.timing_repeats):
        for name, build in candidates.items():
            times[name].append(seconds_per_step(build(), args))
    return {name: min(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and test the ensemble, then (unless `--no-timing`) time it against one member.

    Returns the final `val/...` and the `test/...` metrics (`test/accuracy` is the
    ensemble's, `test/member_{i}/accuracy` member `i`'s) and the `timing/...` figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bootstrap", action="store_true", help="each member trains on its own resample"
    )
    parser.add_argument(
        "--timing-steps",
        type=int,
        default=2000,
        help="training steps per timed run",
    )
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--no-timing", dest="timing", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_steps, args.progress_bar, args.timing = 1, 4, False, False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    start = time.perf_counter()
    trainer = solstice.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=2 if args.smoke else 20,
        devices=1,
        seed=args.seed,
        enable_progress_bar=args.progress_bar,
    )
    datamodule = Digits(batch_size=args.batch_size, eval_batch_size=128, seed=args.seed)
    experiment = trainer.fit(make_ensemble(args.members, args), datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics.update(trainer.test(experiment, datamodule))
    trainer.close()
    seconds = time.perf_counter() - start

    members = [metrics[f"test/member_{i}/accuracy"] for i in range(args.members)]
    data = " (bootstrap)" if args.bootstrap else ""
    print(f"\n{args.members}-member ensemble{data}, {args.epochs} epochs ({seconds:.1f} s):")
    print("  member test accuracy: " + " ".join(f"{a:.4f}" for a in members))
    print(
        f"  members' mean {statistics.fmean(members):.4f}, "
        f"ensemble (averaged probabilities) {metrics['test/accuracy']:.4f}"
    )

    if args.timing:
        best = timing(args)
        one, many = best["1_member"], best[f"{args.members}_members"]
        for name, secs in best.items():
            metrics[f"timing/{name}_ms_per_step"] = 1e3 * secs
        metrics["timing/ratio"] = many / one
        print(
            f"  ms per training step (best of {args.timing_repeats} runs of "
            f"{args.timing_steps} steps, compile excluded): plain model "
            f"{1e3 * best['single']:.3f}, 1-member ensemble {1e3 * one:.3f}, "
            f"{args.members}-member ensemble {1e3 * many:.3f}: {many / one:.2f}x the time "
            f"for {args.members}x the models"
        )
    return metrics


if __name__ == "__main__":
    main()
