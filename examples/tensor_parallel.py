"""Tensor parallelism: a small transformer block trained on a 2-D mesh of data and model axes.

Each 8x8 digit (scikit-learn's real handwritten digits, offline) is read as a sequence of 8
row tokens; a transformer block (self-attention and an MLP, Equinox modules) classifies it.
The Trainer gets a mesh with named axes, `{"data": 2, "model": 2}` on 4 devices: batches are
split over "data", and `solstice.TensorParallel` splits the attention's query/key/value
projections and the MLP's first layer by output features (column-parallel) and the output
projection and the MLP's second layer by input features (row-parallel) over "model"
(Megatron-style). `solstice.Combined` then splits what TP left over "data" too (FSDP), so a
large matrix keeps a quarter of itself on each of the 4 devices. Runs on 4 forced CPU
devices here, or on whatever devices a GPU/TPU host has:

    python examples/tensor_parallel.py                    # TP + FSDP, then replicated
    python examples/tensor_parallel.py --mesh data=1,model=4 --no-fsdp
    python examples/tensor_parallel.py --smoke            # a few steps (the tests run it)

See docs/scaling.md ("Meshes: data and model axes").
"""

import argparse
import os

# 4 CPU devices, before JAX starts (a GPU/TPU host uses its real devices instead).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import solstice  # noqa: E402
from solstice.datamodules import Digits  # noqa: E402


class TransformerBlock(eqx.Module):
    """Pre-norm self-attention and MLP over the 8 row tokens of a digit, then a linear
    head on the mean token."""

    embed: eqx.nn.Linear
    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, dim: int, heads: int, *, key: jax.Array):
        k = jax.random.split(key, 4)
        self.embed = eqx.nn.Linear(8, dim, key=k[0])
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attention = eqx.nn.MultiheadAttention(heads, dim, key=k[1])
        self.norm2 = eqx.nn.LayerNorm(dim)
        # depth 1: two layers, column- then row-parallel
        self.mlp = eqx.nn.MLP(dim, dim, 4 * dim, 1, activation=jax.nn.gelu, key=k[2])
        self.head = eqx.nn.Linear(dim, 10, key=k[3])

    def __call__(self, image: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        tokens = jax.vmap(self.embed)(image.reshape(8, 8))
        h = jax.vmap(self.norm1)(tokens)
        tokens = tokens + self.attention(h, h, h)
        tokens = tokens + jax.vmap(self.mlp)(jax.vmap(self.norm2)(tokens))
        return self.head(jnp.mean(tokens, axis=0))


def make_experiment(dim: int, heads: int, seed: int = 0) -> solstice.ClassificationExperiment:
    model = TransformerBlock(dim, heads, key=jax.random.key(seed))
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adamw(3e-3), model), num_classes=10
    )


def sharding_rules(fsdp: bool, min_size: int = 2**10) -> list:
    """TP over "model"; with `fsdp`, also FSDP over "data" on what TP leaves."""
    tp = solstice.TensorParallel(axis="model")
    if not fsdp:
        return [tp]
    return [solstice.Combined(tp, solstice.FullySharded(axis="data", min_size=min_size))]


def default_mesh() -> str:
    """`data=N/2,model=2` over every device (`data=2,model=2` on 4), or `data=N,model=1`
    for an odd number of devices."""
    model = 2 if jax.device_count() % 2 == 0 else 1
    return f"data={jax.device_count() // model},model={model}"


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,model=2"` -> `{"data": 2, "model": 2}` (a size may be -1: the rest)."""
    try:
        return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(
            f"--mesh takes axis=size pairs like data=2,model=2, got {text!r}."
        ) from None


def train(args: argparse.Namespace, mesh: dict | None, rules: list) -> tuple:
    """Fit on Digits with `mesh` and `rules`; the Trainer and its test metrics (a smoke
    run: its last training metrics)."""
    trainer = solstice.Trainer(
        max_epochs=args.epochs,
        mesh=mesh,
        sharding_rules=rules,
        enable_progress_bar=False,
        limit_train_batches=4 if args.smoke else None,
        limit_val_batches=0 if args.smoke else None,
        num_sanity_val_steps=0,
        compilation_cache=not args.smoke,
    )
    data = Digits(batch_size=64, eval_batch_size=256)
    experiment = trainer.fit(make_experiment(args.dim, args.heads), data)
    if args.smoke:
        return trainer, {k: float(v) for k, v in trainer.callback_metrics.items()}
    return trainer, trainer.test(experiment, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=default_mesh(), help="axis=size pairs")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--no-fsdp", dest="fsdp", action="store_false")
    parser.add_argument("--min-size", type=int, default=2**10, help="FSDP's min_size")
    parser.add_argument("--smoke", action="store_true", help="4 steps, no replicated run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.dim, args.heads, args.min_size = 1, 16, 2, 256
    mesh = parse_mesh(args.mesh)

    trainer, tp = train(args, mesh, sharding_rules(args.fsdp, args.min_size))
    print(trainer.describe_shardings())
    shown = ("train/loss_epoch",) if args.smoke else ("test/accuracy", "test/loss")
    print(f"tensor parallel on {mesh}: " + ", ".join(f"{k} {tp[k]:.4f}" for k in shown))
    if not args.smoke:  # the same run, replicated (data parallel over every device)
        _, replicated = train(args, None, [])
        print("replicated: " + ", ".join(f"{k} {replicated[k]:.4f}" for k in shown))


if __name__ == "__main__":
    main()
