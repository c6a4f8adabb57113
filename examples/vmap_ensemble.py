"""Train an ensemble of small networks at once, on one device, with `eqx.filter_vmap`.

Every member is the same small MLP with its own initialisation and its own optimizer state.
They are stored *stacked* (each array gains a leading member axis) in one `Experiment`, and
one `eqx.filter_vmap`-ed step trains all of them on the same batch: one compiled call, one
dispatch, one set of (batched) matrix multiplies, instead of one per member. The Trainer is
the ordinary one; nothing in it knows about ensembles. Inspired by Will Whitney's
"Parallelizing neural networks on one GPU with JAX"
(https://willwhitney.com/parallel-training-jax.html). On real 8x8 digits, offline:

    python examples/vmap_ensemble.py                 # 8 members, then the timing comparison
    python examples/vmap_ensemble.py --members 16 --no-timing
    python examples/vmap_ensemble.py --smoke         # a few steps (CI)

Metrics come per member (`val/member_3/accuracy`) and for the ensemble, whose prediction is
the members' averaged probabilities (`val/accuracy`). See `docs/examples/vmap_ensemble.md`.
"""

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any, ClassVar

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
    """One member: an MLP over the flattened 8x8 image, 64 -> width -> width -> 10 logits."""
    mlp = eqx.nn.MLP(64, 10, width_size=width, depth=2, activation=jax.nn.gelu, key=key)
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])


# --------------------------------------------------------------------------- metrics
class EnsembleMetrics(solstice.Metrics):
    """Per-member `ClassificationMetrics`, stacked along a leading member axis, and the
    `ClassificationMetrics` of the ensemble's averaged prediction.

    `compute()` returns flat scalars: the ensemble's full battery (`accuracy`, `loss`,
    `f1_macro`, ...), `member_{i}/accuracy` and `member_{i}/loss` for every member, and
    `member_mean/accuracy`, the members' average.

    **Arguments:**

    - `logits`: the members' logits, shape `(members, batch, classes)`.
    - `labels`: integer labels, shape `(batch,)`.
    - `mask`: optional boolean `(batch,)`, false on padding.

    **Example:**

    ```python
    metrics = EnsembleMetrics(logits=jnp.zeros((8, 32, 10)), labels=jnp.zeros(32, int))
    metrics.compute()["member_7/accuracy"]
    ```
    """

    members: solstice.ClassificationMetrics
    ensemble: solstice.ClassificationMetrics

    def __init__(self, *, logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
        num_classes = logits.shape[-1]

        def one(member_logits):
            losses = optax.softmax_cross_entropy_with_integer_labels(member_logits, labels)
            return solstice.ClassificationMetrics(
                logits=member_logits,
                labels=labels,
                loss=losses,
                mask=mask,
                num_classes=num_classes,
            )

        # One `ClassificationMetrics` per member, built by vmap: a single module whose arrays
        # (the confusion matrices, loss sums) have a leading member axis.
        self.members = eqx.filter_vmap(one)(logits)
        # The ensemble predicts the mean of the members' probabilities.
        log_probs = jax.nn.logsumexp(jax.nn.log_softmax(logits), axis=0) - jnp.log(len(logits))
        nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
        self.ensemble = solstice.ClassificationMetrics(
            logits=log_probs, labels=labels, loss=nll, mask=mask, num_classes=num_classes
        )

    @property
    def num_members(self) -> int:
        return self.members.confusion_matrix.shape[0]

    def merge(self, other: "EnsembleMetrics") -> "EnsembleMetrics":
        merge = eqx.filter_vmap(solstice.ClassificationMetrics.merge)
        return eqx.tree_at(
            lambda m: (m.members, m.ensemble),
            self,
            (merge(self.members, other.members), self.ensemble.merge(other.ensemble)),
        )

    def compute(self) -> dict[str, Any]:
        per_member = eqx.filter_vmap(solstice.ClassificationMetrics.compute)(self.members)
        out = dict(self.ensemble.compute())
        for i in range(self.num_members):
            for key in MEMBER_KEYS:
                out[f"member_{i}/{key}"] = per_member[key][i]
        out["member_mean/accuracy"] = jnp.mean(per_member["accuracy"])
        return out


# --------------------------------------------------------------------------- the experiment
class EnsembleExperiment(solstice.Experiment):
    """`num_members` copies of a model, trained together by one vmapped step.

    `models` is one Equinox module whose arrays are stacked along a leading member axis (as
    `eqx.filter_vmap(make_model)(keys)` returns it); `optimizers` likewise holds one optimizer
    state per member, so any optax transformation (including ones with global state, such as
    `optax.clip_by_global_norm`) acts on each member separately.

    **Arguments:**

    - `make_model`: `key -> model`, one member (mapping one example to logits).
    - `transformation`: the optax transformation every member is trained with.
    - `num_members`: the ensemble's size.
    - `key`: PRNG key; member `i` is initialised from `jr.split(key, num_members)[i]`.

    Its steps ignore the rows where `batch["mask"]` is false (`honours_mask`), so the short
    last evaluation batch is padded and masked rather than compiled for.
    """

    honours_mask: ClassVar[bool] = True

    models: eqx.Module
    optimizers: solstice.OptaxOptimizer
    num_members: int = eqx.field(static=True)

    def __init__(
        self,
        make_model: Callable[[jax.Array], eqx.Module],
        transformation: optax.GradientTransformation,
        num_members: int,
        *,
        key: jax.Array,
    ):
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"`num_members` must be an int >= 1, got {num_members!r}.")
        self.models = eqx.filter_vmap(make_model)(jr.split(key, num_members))
        self.optimizers = eqx.filter_vmap(
            lambda model: solstice.OptaxOptimizer(transformation, model)
        )(self.models)
        self.num_members = num_members

    def member(self, i: int) -> eqx.Module:
        """Member `i` as an ordinary (unstacked) model."""
        arrays, static = eqx.partition(self.models, eqx.is_array)
        return eqx.combine(jax.tree.map(lambda x: x[i], arrays), static)

    def train_step(self, batch):
        x, labels, mask = batch["image"], batch["label"], batch.get("mask")
        weights = jnp.ones(labels.shape) if mask is None else mask.astype(jnp.float32)

        def member_step(model, optimizer):
            def loss_fn(model):
                logits = jax.vmap(model)(x)
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0), logits

            grads, logits = eqx.filter_grad(loss_fn, has_aux=True)(model)
            updates, optimizer = optimizer(grads, model)
            return eqx.apply_updates(model, updates), optimizer, logits

        # The whole ensemble in one call: map over the members' stacked parameters and
        # optimizer states; every member sees the same batch (closed over, not mapped).
        models, optimizers, logits = eqx.filter_vmap(member_step)(self.models, self.optimizers)
        new = eqx.tree_at(lambda e: (e.models, e.optimizers), self, (models, optimizers))
        return new, EnsembleMetrics(logits=jax.lax.stop_gradient(logits), labels=labels, mask=mask)

    def _logits(self, x):
        return eqx.filter_vmap(lambda model: jax.vmap(model)(x))(self.models)  # (M, B, C)

    def eval_step(self, batch):
        logits = self._logits(batch["image"])
        return EnsembleMetrics(logits=logits, labels=batch["label"], mask=batch.get("mask"))

    def predict_step(self, batch):
        """The ensemble's class probabilities, `(batch, classes)`."""
        return jnp.mean(jax.nn.softmax(self._logits(batch["image"])), axis=0)


# --------------------------------------------------------------------------- running it
def make_experiment(num_members: int, args: argparse.Namespace) -> EnsembleExperiment:
    """An ensemble of `num_members` MLPs of width `args.width`, each trained with AdamW."""
    return EnsembleExperiment(
        lambda key: make_member(key, args.width),
        optax.adamw(args.lr, weight_decay=1e-4),
        num_members,
        key=jr.key(args.seed),
    )


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
    single = make_member(jr.key(args.seed), args.width)
    candidates = {
        "single": lambda: solstice.ClassificationExperiment(
            single,
            solstice.OptaxOptimizer(optax.adamw(args.lr, weight_decay=1e-4), single),
            num_classes=10,
        ),
        "1_member": lambda: make_experiment(1, args),
        f"{args.members}_members": lambda: make_experiment(args.members, args),
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
    experiment = trainer.fit(make_experiment(args.members, args), datamodule)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics.update(trainer.test(experiment, datamodule))
    trainer.close()
    seconds = time.perf_counter() - start

    members = [metrics[f"test/member_{i}/accuracy"] for i in range(args.members)]
    print(f"\n{args.members}-member ensemble, {args.epochs} epochs ({seconds:.1f} s):")
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
