"""CIFAR-10 ConvNeXt: a ConvNeXt written in Equinox, trained data-parallel, configured by Hydra.

    python examples/cifar_convnext.py                                   # the defaults below
    python examples/cifar_convnext.py model=convnext_cifar_nano data.batch_size=256
    python examples/cifar_convnext.py trainer.max_epochs=10 optim.lr=1e-3 optim.accumulate=2
    python examples/cifar_convnext.py model.depths=[1,1,1,1] trainer.max_epochs=1 smoke=true
    python examples/cifar_convnext.py --cfg job                         # print the config

The model follows Liu et al., "A ConvNet for the 2020s" (2022): a patchify stem, four stages
of ConvNeXt blocks (7x7 depthwise convolution, LayerNorm, an inverted-bottleneck MLP with GELU,
layer scale, stochastic depth) separated by LayerNorm + strided-convolution downsampling
layers, and a pooled LayerNorm + linear head. For 32x32 images the stem patchifies 2x2
instead of 4x4, so the stages see 16, 8, 4 and 2 pixels.

Training uses `ClassificationExperiment` and the `CIFAR10` DataModule with its on-device
augmentation (random crop with 4 pixels of padding, horizontal flip); the Trainer shards every
batch over all devices (`trainer.devices=auto`) and replicates the model. The optimizer is
AdamW on a warmup + cosine schedule, behind optional gradient clipping and gradient
accumulation, all optax transformations. Checkpoints (best by validation accuracy, plus the
last) and a CSV log go to Hydra's run directory, or to `output_dir=...`; `resume=true`
continues from the last checkpoint there.

The config files are in `examples/conf/`. `smoke=true` writes small synthetic files in
CIFAR-10's exact binary format to a temporary directory and trains a few steps on them.
"""

import copy
import itertools
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import equinox as eqx
import hydra
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float, PRNGKeyArray
from omegaconf import DictConfig, OmegaConf

import solstice
from solstice.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, Timer
from solstice.datamodules import CIFAR10

log = logging.getLogger("cifar_convnext")


class LayerNorm2d(eqx.Module):
    """LayerNorm over the channels of a `(channels, height, width)` map, at every pixel."""

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, eps: float = 1e-6):
        self.weight = jnp.ones((channels,))
        self.bias = jnp.zeros((channels,))
        self.eps = eps

    def __call__(self, x: Float[Array, "c h w"], *, key: PRNGKeyArray | None = None):
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = jnp.var(x, axis=0, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class DropPath(eqx.Module):
    """Stochastic depth: drop the whole residual branch of one example with probability `p`.

    Like `eqx.nn.Dropout`, it has an `inference` flag that `eqx.nn.inference_mode` sets
    (which `ClassificationExperiment` does for evaluation).
    """

    p: float = eqx.field(static=True)
    inference: bool = False

    def __call__(self, x: Array, *, key: PRNGKeyArray | None) -> Array:
        if self.inference or self.p == 0.0:
            return x
        if key is None:
            raise ValueError("`DropPath` needs a `key` in training (or `inference=True`).")
        keep = 1.0 - self.p
        return x * jr.bernoulli(key, keep).astype(x.dtype) / keep


class ConvNeXtBlock(eqx.Module):
    """`x + DropPath(gamma * MLP(LayerNorm(DepthwiseConv7x7(x))))`, the MLP per pixel."""

    dwconv: eqx.nn.Conv2d
    norm: LayerNorm2d
    pwconv1: eqx.nn.Linear
    pwconv2: eqx.nn.Linear
    gamma: Float[Array, " channels"] | None
    drop_path: DropPath

    def __init__(self, dim: int, drop_path: float, layer_scale_init: float, *, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        self.dwconv = eqx.nn.Conv2d(dim, dim, 7, padding=3, groups=dim, key=k1)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = eqx.nn.Linear(dim, 4 * dim, key=k2)  # the inverted bottleneck
        self.pwconv2 = eqx.nn.Linear(4 * dim, dim, key=k3)
        self.gamma = layer_scale_init * jnp.ones((dim,)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path)

    def __call__(self, x: Float[Array, "c h w"], *, key: PRNGKeyArray | None = None):
        y = self.norm(self.dwconv(x))
        y = jnp.moveaxis(y, 0, -1)  # (h, w, c): the MLP acts on the channels of each pixel

        def mlp(v):
            return self.pwconv2(jax.nn.gelu(self.pwconv1(v), approximate=False))

        y = jnp.moveaxis(jax.vmap(jax.vmap(mlp))(y), -1, 0)
        if self.gamma is not None:
            y = self.gamma[:, None, None] * y
        return x + self.drop_path(y, key=key)


class ConvNeXt(eqx.Module):
    """ConvNeXt: patchify stem, stages of `ConvNeXtBlock`s with downsampling between them,
    global average pooling, LayerNorm and a linear head.

    **Arguments:**

    - `num_classes`: the number of logits.
    - `depths`, `dims`: blocks and channels of each stage (ConvNeXt-T: `[3, 3, 9, 3]`,
      `[96, 192, 384, 768]`).
    - `patch_size`: the stem's patch (4 for 224x224 ImageNet, 2 or 1 for 32x32 CIFAR).
    - `drop_path_rate`: stochastic depth of the last block (linearly from 0 at the first).
    - `layer_scale_init`: initial layer scale (0 disables it).
    - `in_channels`: input channels.
    - `key`: PRNG key for the initial parameters.
    """

    stem: eqx.nn.Sequential
    downsamples: tuple[eqx.nn.Sequential, ...]
    stages: tuple[tuple[ConvNeXtBlock, ...], ...]
    head_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self,
        num_classes: int = 10,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        dims: tuple[int, ...] = (64, 128, 256, 512),
        *,
        patch_size: int = 2,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if len(depths) != len(dims) or not depths:
            raise ValueError(
                f"`depths` {list(depths)} and `dims` {list(dims)} must be non-empty and of the "
                "same length: one entry per stage."
            )
        stem_key, down_key, block_key, head_key = jr.split(key, 4)
        self.stem = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(in_channels, dims[0], patch_size, stride=patch_size, key=stem_key),
                LayerNorm2d(dims[0]),
            ]
        )
        down_keys = jr.split(down_key, max(len(dims) - 1, 1))
        self.downsamples = tuple(
            eqx.nn.Sequential(
                [LayerNorm2d(dims[i]), eqx.nn.Conv2d(dims[i], dims[i + 1], 2, stride=2, key=k)]
            )
            for i, k in zip(range(len(dims) - 1), down_keys)
        )
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        block_keys = iter(jr.split(block_key, sum(depths)))
        stages, start = [], 0
        for depth, dim in zip(depths, dims):
            stages.append(
                tuple(
                    ConvNeXtBlock(dim, rates[start + j], layer_scale_init, key=next(block_keys))
                    for j in range(depth)
                )
            )
            start += depth
        self.stages = tuple(stages)
        self.head_norm = eqx.nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = eqx.nn.Linear(dims[-1], num_classes, key=head_key)

    def __call__(
        self, x: Float[Array, "c h w"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " classes"]:
        blocks = sum(len(stage) for stage in self.stages)
        keys = iter(jr.split(key, blocks) if key is not None else [None] * blocks)
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            for block in stage:
                x = block(x, key=next(keys))
        return self.head(self.head_norm(jnp.mean(x, axis=(1, 2))))


def trunc_normal_init(model: Any, key: PRNGKeyArray, std: float = 0.02) -> Any:
    """The paper's initialisation: every conv and linear weight from a normal of std `std`
    truncated at 2 std, every bias zero. (Equinox's layers start with uniform weights.)

    One draw covers all the weights, cut into pieces: under `jit`, one random draw compiles
    far faster on CPU than one per layer.
    """

    def is_layer(x):
        return isinstance(x, (eqx.nn.Conv, eqx.nn.Linear))

    def layers(m):
        return [x for x in jax.tree.leaves(m, is_leaf=is_layer) if is_layer(x)]

    shapes = [layer.weight.shape for layer in layers(model)]
    sizes = [math.prod(shape) for shape in shapes]
    flat = std * jr.truncated_normal(key, -2.0, 2.0, (sum(sizes),))
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    weights = [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]
    model = eqx.tree_at(lambda m: [layer.weight for layer in layers(m)], model, weights)
    biased = [layer.bias for layer in layers(model) if layer.bias is not None]
    return eqx.tree_at(
        lambda m: [layer.bias for layer in layers(m) if layer.bias is not None],
        model,
        [jnp.zeros_like(bias) for bias in biased],
    )


# --------------------------------------------------------------------------------------------
# The run: everything is built from the config, so the tests compose a config and call `run`.


def make_model(m: DictConfig, key: PRNGKeyArray) -> ConvNeXt:
    """The ConvNeXt that the `model` config describes, with the paper's initialisation.

    Built inside one `eqx.filter_jit`: initialising layer by layer outside `jit` would compile
    each random draw of each distinct shape separately, which takes longer than the model.
    """
    depths, dims = tuple(m.depths), tuple(m.dims)

    @eqx.filter_jit
    def init(key):
        build_key, init_key = jr.split(key)
        model = ConvNeXt(
            10,
            depths,
            dims,
            patch_size=m.patch_size,
            drop_path_rate=m.drop_path_rate,
            layer_scale_init=m.layer_scale_init,
            key=build_key,
        )
        return trunc_normal_init(model, init_key)

    return init(key)


def make_optimizer(cfg: DictConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule, behind clipping and accumulation (all optax)."""
    optim = cfg.optim
    accumulate = int(optim.accumulate)
    updates_per_epoch = max(steps_per_epoch // accumulate, 1)
    total = max(int(cfg.trainer.max_epochs) * updates_per_epoch, 2)
    warmup = min(int(optim.warmup_epochs) * updates_per_epoch, total // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(optim.lr), warmup, total)
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=schedule, weight_decay=float(optim.weight_decay)
    )
    chain = (
        [adamw] if optim.clip_norm is None else [optax.clip_by_global_norm(optim.clip_norm), adamw]
    )
    transformation = optax.chain(*chain)
    if accumulate > 1:  # average `accumulate` batches' gradients, then make one update
        transformation = optax.MultiSteps(transformation, every_k_schedule=accumulate)
        transformation = transformation.gradient_transformation()
    return transformation


def build(
    cfg: DictConfig, data_dir: str, output_dir: str | None
) -> tuple[solstice.ClassificationExperiment, CIFAR10, solstice.Trainer, ModelCheckpoint | None]:
    """The experiment, DataModule, Trainer (and its checkpoint callback) that `cfg` describes."""
    checkpoint = None
    callbacks = [ModelSummary(), LearningRateMonitor(), Timer()]
    loggers = [solstice.PythonLogger()]
    if output_dir is not None:
        checkpoint = ModelCheckpoint(
            os.path.join(output_dir, "checkpoints"),
            monitor=cfg.checkpoint.monitor,
            mode=cfg.checkpoint.mode,
            save_top_k=cfg.checkpoint.save_top_k,
        )
        callbacks.append(checkpoint)
        loggers.append(solstice.CSVLogger(os.path.join(output_dir, "logs")))
    t = cfg.trainer
    trainer = solstice.Trainer(
        max_epochs=t.max_epochs,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        log_every_n_steps=t.log_every_n_steps,
        steps_per_execution=t.steps_per_execution,
        devices=t.devices,
        enable_progress_bar=t.enable_progress_bar,
        callbacks=callbacks,
        loggers=loggers,
        seed=cfg.seed,
    )
    d = cfg.data
    datamodule = CIFAR10(
        data_dir,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        val_fraction=d.val_fraction,
        augment=d.augment,
        seed=cfg.seed,
        download=d.download,
        on_device=d.on_device,
        mesh=trainer.mesh if d.on_device else None,  # the Trainer's devices
    )
    datamodule.setup("fit")  # reads the files now, to size the learning-rate schedule
    steps_per_epoch = len(datamodule.train_dataloader())
    if t.limit_train_batches is not None:
        limit = t.limit_train_batches
        steps_per_epoch = int(limit * steps_per_epoch) if isinstance(limit, float) else limit

    model_key, experiment_key = jr.split(jr.key(cfg.seed))
    model = make_model(cfg.model, model_key)
    optimizer = solstice.OptaxOptimizer(make_optimizer(cfg, steps_per_epoch), model)
    experiment = solstice.ClassificationExperiment(
        model, optimizer, num_classes=10, key=experiment_key
    )
    return experiment, datamodule, trainer, checkpoint


def smoke_config(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` shrunk to a few steps of small batches (the model is left as it is)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.batch_size = min(cfg.data.batch_size, 32)
    cfg.data.eval_batch_size = min(cfg.data.eval_batch_size, 64)
    cfg.data.download = False
    cfg.trainer.max_epochs = min(cfg.trainer.max_epochs, 2)
    cfg.trainer.limit_train_batches = 4
    cfg.trainer.log_every_n_steps = cfg.trainer.steps_per_execution
    cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, 1)
    return cfg


def run(cfg: DictConfig, default_output_dir: str | None = None) -> dict[str, float]:
    """Train and test as `cfg` says; return the test metrics (of the best checkpoint if
    there is an output directory, else of the final model).

    Checkpoints and logs go to `cfg.output_dir`, else to `default_output_dir` (`main` passes
    Hydra's run directory), else nowhere. With `cfg.smoke`, the data are synthetic files in a
    temporary directory, which also holds the outputs unless `cfg.output_dir` is set.
    """
    if not cfg.smoke:
        output_dir = cfg.output_dir if cfg.output_dir is not None else default_output_dir
        return train(cfg, cfg.data.data_dir, output_dir)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import _synthetic

    cfg = smoke_config(cfg)
    with tempfile.TemporaryDirectory(prefix="solstice-cifar-smoke-") as tmp:
        _synthetic.write_cifar10(tmp, num_per_batch=64, num_test=64, seed=cfg.seed)
        output_dir = cfg.output_dir if cfg.output_dir is not None else os.path.join(tmp, "run")
        return train(cfg, tmp, output_dir)


def train(cfg: DictConfig, data_dir: str, output_dir: str | None) -> dict[str, float]:
    """Fit, then test the best checkpoint (or the final model if nothing is saved)."""
    experiment, datamodule, trainer, checkpoint = build(cfg, data_dir, output_dir)
    log.info(
        "ConvNeXt depths=%s dims=%s, data parallel over %d %s device(s)",
        list(cfg.model.depths),
        list(cfg.model.dims),
        len(trainer.devices),
        trainer.devices[0].platform,
    )
    start = time.perf_counter()
    config = {"config": OmegaConf.to_container(cfg, resolve=True)}
    for logger in trainer.loggers:  # the whole config, beside what the Trainer logs
        logger.log_hyperparams(config)
    with trainer:
        trained = trainer.fit(experiment, datamodule, ckpt_path="last" if cfg.resume else None)
        if checkpoint is not None and checkpoint.best_model_path:
            trained = solstice.load(checkpoint.best_model_path, like=experiment)
        metrics = trainer.test(trained, datamodule)
    (timer,) = [cb for cb in trainer.callbacks if isinstance(cb, Timer)]
    log.info(
        "fit + test in %.1f s; steady-state training throughput %s samples/s",
        time.perf_counter() - start,
        f"{timer.steady_samples_per_sec:.0f}" if timer.steady_samples_per_sec else "n/a",
    )
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="cifar_convnext")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("solstice").setLevel(logging.INFO)
    log.setLevel(logging.INFO)
    metrics = run(cfg, default_output_dir=HydraConfig.get().runtime.output_dir)
    for name, value in sorted(metrics.items()):
        print(f"  {name:<28} {value:.4f}")


if __name__ == "__main__":
    main()
