"""Learning Not to Learn (Kim et al., CVPR 2019): unlearn a colour bias on Colour-MNIST.

A custom `solstice.Experiment` with three networks, trained min-max in one compiled step:

- `f`, the feature extractor (Equinox): coloured image -> feature map;
- `g`, the digit classifier (Equinox): feature map -> digit logits;
- `h`, the colour predictor (Flax NNX): feature map -> every pixel's colour, 8 bins per RGB
  channel (the paper's bias label).

`h` learns to predict the colour from `f`'s features. Between `f` and `h` sits a gradient
reversal layer, so the same backward pass that teaches `h` pushes `f` to make colour
*unpredictable*; the paper's entropy term (`lam`) further asks `f` to leave `h` uncertain.
`g` only ever sees the digit loss. Run offline on coloured 8x8 `Digits`:

    python examples/adversarial_colour_mnist.py                     # LNL and baseline, seed 0
    python examples/adversarial_colour_mnist.py --seeds 0 1 2 3 4 --variance 0.02 0.03 0.05
    python examples/adversarial_colour_mnist.py --smoke             # a few steps (CI)

The test split colours every digit at random (colour independent of the label), so its
accuracy is the *unbiased* accuracy; `--mode baseline` trains the same `f` and `g` on the
digit loss alone (with `h` as a detached probe that measures how much colour the features
carry). See `docs/examples/adversarial_colour_mnist.md`.
"""

import argparse
import functools
import logging
import statistics
import time
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from flax import nnx

import solstice
from solstice.datamodules import ColourMNIST, Digits

COLOUR_BINS = 8  # per RGB channel, as in the paper


# --------------------------------------------------------------------------- gradient reversal
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def reverse_gradient(x: jax.Array, scale: float) -> jax.Array:
    """Identity on the way forward; multiplies the gradient by `-scale` on the way back."""
    return x


def _reverse_fwd(x, scale):
    return x, None


def _reverse_bwd(scale, _, g):
    return (jax.tree.map(lambda t: -scale * t, g),)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


# --------------------------------------------------------------------------- the networks
class FeatureExtractor(eqx.Module):
    """`f` (Equinox): one `(3, 8, 8)` image -> a `(width, 8, 8)` map of *local* features.

    One 3x3 convolution, as the paper takes its features from an early layer: a local feature
    cannot hide the colour by first recognising the digit, so the adversary forces the
    features themselves to become colour-blind.
    """

    conv: eqx.nn.Conv2d

    def __init__(self, width: int, *, key: jax.Array):
        self.conv = eqx.nn.Conv2d(3, width, 3, padding=1, key=key)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv(x))


class DigitClassifier(eqx.Module):
    """`g` (Equinox): a `(width, 8, 8)` feature map -> 10 digit logits."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, width: int, *, key: jax.Array):
        k1, k2, k3 = jr.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(width, 2 * width, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, key=k2)
        self.head = eqx.nn.Linear(2 * width * 4 * 4, 10, key=k3)

    def __call__(self, features: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(features))))  # (2w, 4, 4)
        return self.head(jnp.ravel(hidden))


class ColourPredictor(nnx.Module):
    """`h` (Flax NNX): `(B, 8, 8, width)` feature maps -> `(B, 8, 8, 3, 8)` colour logits:
    for every pixel, each RGB channel's value in 8 bins.

    Flax's convention: batched, channels last. The experiment transposes Equinox's
    `(B, C, H, W)` features before calling it.
    """

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(width, width, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(width, 3 * COLOUR_BINS, kernel_size=(1, 1), rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        # Scale-free: `f` cannot hide the colour by merely shrinking its features.
        rms = jnp.sqrt(jnp.mean(features**2, axis=(1, 2, 3), keepdims=True))
        features = features / (rms + 1e-6)
        logits = self.conv2(nnx.relu(self.conv1(features)))
        return logits.reshape(*logits.shape[:-1], 3, COLOUR_BINS)


def colour_bins(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bias label, as in the paper: every pixel's colour, 8 bins per channel.

    **Arguments:** `images`, `(B, 3, H, W)` in [0, 1].

    **Returns:** `(bins, foreground)`: int32 bins `(B, H, W, 3)` in [0, 8), and a boolean
    `(B, H, W)` that is false on the black background (left out of the colour loss).
    """
    pixels = jnp.transpose(images, (0, 2, 3, 1))
    bins = jnp.clip(jnp.floor(pixels * COLOUR_BINS), 0, COLOUR_BINS - 1).astype(jnp.int32)
    return bins, jnp.max(pixels, axis=-1) > 0


# --------------------------------------------------------------------------- metrics
class LNLMetrics(solstice.Metrics):
    """Three `ClassificationMetrics` composed, plus the mean negative entropy of `h`.

    - `digit`: the classifier against the digit label (`accuracy`, `loss`, `f1_macro`, ...);
    - `colour`: `h` against the colour bins, one entry per foreground pixel and RGB channel
      (`colour_accuracy`, `colour_loss`);
    - `follows_colour`: the classifier against the index of the image's mean colour. On the
      unbiased test split it is about 0.1 for a model that ignores colour, and approaches 1
      for one that reads the colour instead of the digit.
    """

    digit: solstice.ClassificationMetrics
    colour: solstice.ClassificationMetrics
    follows_colour: solstice.ClassificationMetrics
    neg_entropy_sum: jax.Array
    count: jax.Array

    def __init__(
        self,
        *,
        logits: jax.Array,
        labels: jax.Array,
        losses: jax.Array,
        colour_logits: jax.Array,
        colour_labels: jax.Array,
        colour_losses: jax.Array,
        foreground: jax.Array,
        colour_index: jax.Array,
        neg_entropy: jax.Array,
        mask: jax.Array | None = None,
    ):
        keep = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
        self.digit = solstice.ClassificationMetrics(
            logits=logits, labels=labels, loss=losses, num_classes=10, mask=keep
        )
        self.colour = solstice.ClassificationMetrics(
            logits=colour_logits,
            labels=colour_labels,
            loss=colour_losses,
            num_classes=COLOUR_BINS,
            mask=jnp.broadcast_to(
                (keep[:, None, None] & foreground)[..., None], colour_labels.shape
            ),
        )
        self.follows_colour = solstice.ClassificationMetrics(
            logits=logits, labels=colour_index, num_classes=10, mask=keep
        )
        weights = keep.astype(jnp.float32)
        self.neg_entropy_sum = jnp.sum(neg_entropy * weights)
        self.count = jnp.sum(weights)

    def merge(self, other: "LNLMetrics") -> "LNLMetrics":
        return eqx.tree_at(
            lambda m: (m.digit, m.colour, m.follows_colour, m.neg_entropy_sum, m.count),
            self,
            (
                self.digit.merge(other.digit),
                self.colour.merge(other.colour),
                self.follows_colour.merge(other.follows_colour),
                self.neg_entropy_sum + other.neg_entropy_sum,
                self.count + other.count,
            ),
        )

    def compute(self) -> dict[str, Any]:
        colour = self.colour.compute()
        return {
            **self.digit.compute(),
            "colour_accuracy": colour["accuracy"],
            "colour_loss": colour["loss"],
            "follows_colour": self.follows_colour.compute()["accuracy"],
            "neg_entropy": self.neg_entropy_sum / jnp.maximum(self.count, 1.0),
        }


# --------------------------------------------------------------------------- the experiment
class LearningNotToLearn(solstice.Experiment):
    """Feature extractor `f` and classifier `g` (Equinox), colour predictor `h` (Flax NNX).

    One `train_step` is one forward and one backward pass through all three networks. The
    loss is `L_digit(g(f(x))) + lam * negentropy(h(f(x))) + L_colour(h(R_mu(f(x))))`, where
    `R_mu` is the gradient reversal layer and `h`'s parameters are held fixed in the entropy
    term. So `g` descends `L_digit`; `h` descends `L_colour`; `f` descends
    `L_digit + lam * negentropy - mu * L_colour`: it learns the digit while making the colour
    unpredictable. With `adversarial=False` (the baseline) `f` and `g` see `L_digit` alone and
    `h` is trained on detached features: a probe of how much colour the features carry.

    `h` lives here in Flax's functional form: `nnx.split` gives its `GraphDef` (static,
    hashable: part of the compiled step) and its `nnx.State` (a pytree of arrays, like any
    other field: donated, updated, checkpointed). `nnx.merge` rebuilds the module inside
    the step. The steps ignore the rows where `batch["mask"]` is false (`honours_mask`).
    """

    honours_mask: ClassVar[bool] = True

    features: FeatureExtractor
    classifier: DigitClassifier
    colour_params: nnx.State
    optimizer: solstice.Optimizer
    colour_optimizer: solstice.Optimizer
    colour_graph: nnx.GraphDef = eqx.field(static=True)
    lam: float = eqx.field(static=True)
    mu: float = eqx.field(static=True)
    adversarial: bool = eqx.field(static=True)

    def __init__(
        self,
        features: FeatureExtractor,
        classifier: DigitClassifier,
        colour_predictor: nnx.Module,
        transformation: optax.GradientTransformation,
        colour_transformation: optax.GradientTransformation,
        *,
        lam: float = 1.0,
        mu: float = 10.0,
        adversarial: bool = True,
    ):
        self.features = features
        self.classifier = classifier
        self.colour_graph, self.colour_params = nnx.split(colour_predictor, nnx.Param)
        self.optimizer = solstice.OptaxOptimizer(transformation, (features, classifier))
        self.colour_optimizer = solstice.OptaxOptimizer(colour_transformation, self.colour_params)
        self.lam = float(lam)
        self.mu = float(mu)
        self.adversarial = bool(adversarial)

    @property
    def colour_predictor(self) -> nnx.Module:
        """`h` as a Flax NNX module (a fresh copy of the current parameters)."""
        return nnx.merge(self.colour_graph, self.colour_params)

    def _forward(self, models, colour_params, images, *, train: bool):
        """Digit logits `(B, 10)`, colour logits `(B, H, W, 3, 8)` and, per pixel and
        channel, the negative entropy of `h`'s prediction `(B, H, W, 3)`."""
        features_net, classifier = models
        features = jax.vmap(features_net)(images)  # Equinox: per example, (B, C, H, W)
        logits = jax.vmap(classifier)(features)
        channels_last = jnp.transpose(features, (0, 2, 3, 1))  # Flax: batched, (B, H, W, C)
        h = nnx.merge(self.colour_graph, colour_params)
        if not train:
            colour_logits = h(channels_last)
            probe_logits = colour_logits
        elif self.adversarial:
            colour_logits = h(reverse_gradient(channels_last, self.mu))
            # The entropy term trains `f` only: `h` is frozen there, as in the paper.
            frozen = nnx.merge(self.colour_graph, jax.lax.stop_gradient(colour_params))
            probe_logits = frozen(channels_last)
        else:
            colour_logits = h(jax.lax.stop_gradient(channels_last))
            probe_logits = jax.lax.stop_gradient(colour_logits)
        log_p = jax.nn.log_softmax(probe_logits, axis=-1)
        neg_entropy = jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
        return logits, colour_logits, neg_entropy

    def _evaluate(self, models, colour_params, batch, *, train: bool):
        """Run the networks on a batch: the loss to minimise and the step's `LNLMetrics`."""
        images, labels, mask = batch["image"], batch["label"], batch.get("mask")
        colour_labels, foreground = colour_bins(images)
        keep = jnp.ones(labels.shape) if mask is None else mask.astype(jnp.float32)
        logits, colour_logits, neg_entropy = self._forward(
            models, colour_params, images, train=train
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        colour_losses = optax.softmax_cross_entropy_with_integer_labels(
            colour_logits, colour_labels
        )  # (B, H, W, 3)
        # Means over the foreground pixels (and channels) of each image, then over the batch.
        pixels = foreground.astype(jnp.float32) * keep[:, None, None]
        per_pixel = jnp.sum(pixels) * 3
        colour_loss = jnp.sum(colour_losses * pixels[..., None]) / jnp.maximum(per_pixel, 1.0)
        loss = jnp.sum(losses * keep) / jnp.maximum(jnp.sum(keep), 1.0) + colour_loss
        if train and self.adversarial and self.lam:
            entropy = jnp.sum(neg_entropy * pixels[..., None]) / jnp.maximum(per_pixel, 1.0)
            loss = loss + self.lam * entropy
        per_image = jnp.sum(neg_entropy * pixels[..., None], axis=(1, 2, 3)) / jnp.maximum(
            3 * jnp.sum(pixels, axis=(1, 2)), 1.0
        )
        metrics = LNLMetrics(
            logits=jax.lax.stop_gradient(logits),
            labels=labels,
            losses=jax.lax.stop_gradient(losses),
            colour_logits=jax.lax.stop_gradient(colour_logits),
            colour_labels=colour_labels,
            colour_losses=jax.lax.stop_gradient(colour_losses),
            foreground=foreground,
            colour_index=batch["colour"],
            neg_entropy=jax.lax.stop_gradient(per_image),
            mask=mask,
        )
        return loss, metrics

    def train_step(self, batch):
        def loss_fn(params):
            models, colour_params = params
            return self._evaluate(models, colour_params, batch, train=True)

        models = (self.features, self.classifier)
        grads, metrics = eqx.filter_grad(loss_fn, has_aux=True)((models, self.colour_params))
        model_grads, colour_grads = grads
        # Equinox side: an Equinox pytree, updated with `eqx.apply_updates`.
        updates, optimizer = self.optimizer(model_grads, models)
        features, classifier = eqx.apply_updates(models, updates)
        # Flax side: an `nnx.State`, a plain pytree of arrays, updated with optax.
        colour_updates, colour_optimizer = self.colour_optimizer(colour_grads, self.colour_params)
        colour_params = optax.apply_updates(self.colour_params, colour_updates)
        new = eqx.tree_at(
            lambda e: (e.features, e.classifier, e.colour_params, e.optimizer, e.colour_optimizer),
            self,
            (features, classifier, colour_params, optimizer, colour_optimizer),
        )
        return new, metrics

    def eval_step(self, batch):
        models = (self.features, self.classifier)
        return self._evaluate(models, self.colour_params, batch, train=False)[1]

    def predict_step(self, batch):
        """Digit probabilities, `(B, 10)`."""
        features = jax.vmap(self.features)(batch["image"])
        return jax.nn.softmax(jax.vmap(self.classifier)(features), axis=-1)


def make_experiment(
    seed: int,
    *,
    adversarial: bool,
    width: int = 16,
    lr: float = 1e-3,
    colour_lr: float = 1e-3,
    lam: float = 1.0,
    mu: float = 10.0,
) -> LearningNotToLearn:
    """`f`, `g` (from `seed`, so LNL and the baseline start from the same weights) and `h`."""
    key_f, key_g, key_h = jr.split(jr.key(seed), 3)
    return LearningNotToLearn(
        FeatureExtractor(width, key=key_f),
        DigitClassifier(width, key=key_g),
        ColourPredictor(width, rngs=nnx.Rngs(key_h)),
        optax.adam(lr),
        optax.adam(colour_lr),
        lam=lam,
        mu=mu,
        adversarial=adversarial,
    )


def _param_change(before: nnx.State, after: nnx.State) -> float:
    """`||after - before|| / ||before||` over all of `h`'s parameters."""
    diff = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), after, before)
    norm = jax.tree.map(lambda a: jnp.sum(a**2), before)
    return float(jnp.sqrt(sum(jax.tree.leaves(diff)) / sum(jax.tree.leaves(norm))))


# --------------------------------------------------------------------------- running it
def run(
    mode: str,
    variance: float,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Train one model (`mode` is `"lnl"` or `"baseline"`); return its val and test metrics."""
    experiment = make_experiment(
        seed,
        adversarial=mode == "lnl",
        width=args.width,
        lr=args.lr,
        colour_lr=args.colour_lr,
        lam=args.lam,
        mu=args.mu,
    )
    datamodule = ColourMNIST(
        Digits(batch_size=args.batch_size, eval_batch_size=128, seed=seed),
        variance=variance,
        seed=seed,
    )
    trainer = solstice.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        log_every_n_steps=args.log_every,
        check_val_every_n_epoch=args.epochs if args.max_steps is None else 1,
        devices=1,
        seed=seed,
        enable_progress_bar=args.progress_bar,
    )
    start = time.perf_counter()
    trained = trainer.fit(experiment, datamodule)
    test = trainer.test(trained, datamodule)
    seconds = time.perf_counter() - start
    trainer.close()
    val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        **val,
        **test,
        "colour_param_change": _param_change(experiment.colour_params, trained.colour_params),
        "seconds": seconds,
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        if key in ("test/accuracy", "val/accuracy", "test/follows_colour"):
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train every (variance, mode, seed), print the table, and return the means over seeds
    as `{"lnl/sigma2=0.02/test/accuracy": ..., "baseline/sigma2=0.02/val/accuracy": ...,
    ".../test/accuracy_std": ..., ".../colour_param_change": ..., ...}`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["both", "lnl", "baseline"], default="both")
    parser.add_argument(
        "--variance",
        type=float,
        nargs="+",
        default=[0.02],
        help="colour noise variance sigma^2 (the paper's 0.020 ... 0.050)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--colour-lr", type=float, default=1e-3, help="learning rate of h")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--lam", type=float, default=1.0, help="entropy weight (lambda)")
    parser.add_argument("--mu", type=float, default=10.0, help="gradient reversal scale (mu)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.max_steps, args.log_every, args.progress_bar = 1, 4, 2, False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    modes = ["baseline", "lnl"] if args.mode == "both" else [args.mode]
    start = time.perf_counter()
    results: dict[str, float] = {}
    rows = []
    for variance in args.variance:
        for mode in modes:
            runs = [run(mode, variance, seed, args) for seed in args.seeds]
            summary = _summary(runs)
            for key, value in summary.items():
                results[f"{mode}/sigma2={variance:g}/{key}"] = value
            rows.append((variance, mode, runs, summary))

    print(
        f"\nColour-MNIST on Digits, seeds {args.seeds}, {args.epochs} epochs "
        f"({time.perf_counter() - start:.1f} s in all):"
    )
    print(
        f"  {'sigma^2':>7} {'mode':<8} {'unbiased test acc':>20} {'per seed':<34} "
        f"{'biased val acc':>14} {'follows colour':>14} {'h colour acc':>12}"
    )
    for variance, mode, runs, s in rows:
        per_seed = " ".join(f"{r['test/accuracy']:.3f}" for r in runs)
        print(
            f"  {variance:>7g} {mode:<8} {s['test/accuracy']:>12.4f} +- {s['test/accuracy_std']:.4f} "
            f"{per_seed:<34} {s.get('val/accuracy', float('nan')):>14.4f} "
            f"{s['test/follows_colour']:>14.4f} {s['test/colour_accuracy']:>12.4f}"
        )
    return results


if __name__ == "__main__":
    main()
