"""MNIST MLP: an MNIST classifier built only from Solstice's ready-made parts.

    python examples/mnist_mlp.py --data-dir data            # downloads MNIST if missing
    python examples/mnist_mlp.py --data-dir data --resume   # continue from the last checkpoint
    python examples/mnist_mlp.py --smoke                    # a few steps on synthetic files

The pieces: the `MNIST` DataModule (IDX files, downloaded with MD5 checks), an Equinox MLP in
`ClassificationExperiment`, `OptaxOptimizer` over an optax chain (gradient clipping, AdamW,
warmup + cosine schedule), `ModelCheckpoint` (best by validation accuracy, plus the last) and
`EarlyStopping`, and `PythonLogger` + `CSVLogger` (+ `TensorBoardLogger` with
`--tensorboard`). After training, the best checkpoint is loaded and tested.

`--smoke` writes small synthetic files in MNIST's exact on-disk format to a temporary
directory and runs two short epochs on them: the same code path as a real run, in seconds.
"""

import argparse
import logging
import os
import sys
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import solstice
from solstice.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from solstice.datamodules import MNIST

DEFAULT_OUT = "runs/mnist_mlp"


def make_model(key: jax.Array, *, width: int = 512, depth: int = 2) -> eqx.Module:
    """An MLP over the flattened 28x28 image: 784 -> width (x depth) -> 10 logits."""
    mlp = eqx.nn.MLP(28 * 28, 10, width_size=width, depth=depth, activation=jax.nn.gelu, key=key)
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])


def make_optimizer(args: argparse.Namespace, steps_per_epoch: int) -> optax.GradientTransformation:
    """Clip, then AdamW on a warmup + cosine schedule (readable by `inject_hyperparams`)."""
    total = max(args.epochs * steps_per_epoch, 2)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=min(steps_per_epoch, total // 2), decay_steps=total
    )
    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=1e-4)
    return optax.chain(optax.clip_by_global_norm(1.0), adamw)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data", help="holds MNIST/raw/ (made if missing)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"checkpoints and logs (default {DEFAULT_OUT}; smoke: a temp dir)",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--patience", type=int, default=3, help="EarlyStopping patience")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="log every n steps")
    parser.add_argument("--devices", default="auto", help='"auto" or a number of devices')
    parser.add_argument("--on-device", action="store_true", help="keep MNIST on the devices")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    parser.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="two short epochs of a narrower MLP on synthetic MNIST files in a temp dir",
    )
    args = parser.parse_args(argv)
    if args.devices != "auto":
        args.devices = int(args.devices)
    return args


def train(args: argparse.Namespace) -> dict[str, float]:
    """Fit on `args.data_dir`, then test the best checkpoint; return its test metrics."""
    checkpoint = ModelCheckpoint(
        os.path.join(args.out, "checkpoints"), monitor="val/accuracy", mode="max"
    )
    loggers = [solstice.PythonLogger(), solstice.CSVLogger(os.path.join(args.out, "logs"))]
    if args.tensorboard:
        loggers.append(solstice.TensorBoardLogger(os.path.join(args.out, "tensorboard")))
    trainer = solstice.Trainer(
        max_epochs=args.epochs,
        callbacks=[
            checkpoint,
            EarlyStopping("val/accuracy", mode="max", patience=args.patience),
            LearningRateMonitor(),  # logs `lr`, read from the `inject_hyperparams` state
        ],
        loggers=loggers,
        log_every_n_steps=args.log_every,
        devices=args.devices,
        seed=args.seed,
        enable_progress_bar=not args.no_progress_bar,
    )
    datamodule = MNIST(
        args.data_dir,
        batch_size=args.batch_size,
        eval_batch_size=4 * args.batch_size,
        seed=args.seed,
        download=not args.smoke,
        on_device=args.on_device,
        mesh=trainer.mesh if args.on_device else None,  # the Trainer's devices
    )
    datamodule.setup("fit")  # reads the files now, to size the learning-rate schedule
    steps_per_epoch = len(datamodule.train_dataloader())

    model_key, experiment_key = jax.random.split(jax.random.key(args.seed))
    model = make_model(model_key, width=args.width, depth=args.depth)
    optimizer = solstice.OptaxOptimizer(make_optimizer(args, steps_per_epoch), model)
    experiment = solstice.ClassificationExperiment(
        model, optimizer, num_classes=10, key=experiment_key
    )
    with trainer:
        trainer.fit(experiment, datamodule, ckpt_path="last" if args.resume else None)
        # Test the best checkpoint (by validation accuracy), not merely the last epoch's model.
        best = solstice.load(checkpoint.best_model_path, like=experiment)
        metrics = trainer.test(best, datamodule)
    print(
        f"best checkpoint: {checkpoint.best_model_path} "
        f"(val/accuracy {checkpoint.best_model_score:.4f})"
    )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("solstice").setLevel(logging.INFO)  # Solstice's lines, not Orbax's
    start = time.perf_counter()
    if not args.smoke:
        args.out = args.out or DEFAULT_OUT
        metrics = train(args)
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        import _synthetic

        with tempfile.TemporaryDirectory(prefix="solstice-mnist-smoke-") as tmp:
            _synthetic.write_mnist(tmp, num_train=512, num_test=128, seed=args.seed)
            args.data_dir = tmp
            args.out = args.out or os.path.join(tmp, "run")
            args.epochs = min(args.epochs, 2)
            args.batch_size = min(args.batch_size, 32)
            args.width = min(args.width, 64)
            args.log_every = min(args.log_every, 5)
            metrics = train(args)
    print(f"\nTest metrics of the best checkpoint ({time.perf_counter() - start:.1f} s):")
    for name, value in sorted(metrics.items()):
        print(f"  {name:<28} {value:.4f}")
    return metrics


if __name__ == "__main__":
    main()
