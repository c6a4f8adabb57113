"""Image-classification training throughput on an accelerator: Solstice against a hand-written
sharded loop (issue 6: "CIFAR-shaped ResNet-18 or ConvNeXt training images/s, Solstice against
a hand-written sharded loop, target at least 0.95x, recorded with the device name").

    python benchmarks/image_throughput.py                    # ResNet-18, batch 256, float32
    python benchmarks/image_throughput.py --dtype bfloat16   # convolutions in bfloat16
    python benchmarks/image_throughput.py --model convnext   # examples/cifar_convnext.py's
    python benchmarks/image_throughput.py --smoke            # tiny models: checks the script

The data are synthetic and CIFAR-10-shaped: `uint8 (N, 3, 32, 32)` images (a per-class
template plus noise, so there is something to learn) and `int32` labels, generated with numpy;
nothing is downloaded. Every contestant keeps the whole set on the devices (replicated) and
decodes `uint8 -> float32` (`PixelDecode` with CIFAR-10's statistics) inside its step; there
is no augmentation. All start from the same initial experiment and, epoch `e`, visit the
examples in the order `epoch_permutation(N, 0, e)`, so they train the same thing: after the
warm-up epoch their parameters are compared.

Contestants (all data-parallel over every device: a 1-D mesh with axis `"batch"`, batches
sharded along it, the experiment replicated):

- `hand-written sharded loop`: the reference, what an expert writes by hand around the
  experiment's own `train_step` (the work Solstice compiles, metric battery included): one
  `jax.jit` step with donation that gathers its batch on the device by a device-resident step
  counter, decodes it, constrains it to `NamedSharding(mesh, P("batch"))`, runs `train_step`
  and merges its `ClassificationMetrics` into an on-device accumulator; the epoch's order is
  uploaded once; nothing is read back until the epoch ends, when the epoch's metrics are
  computed and waited for. The only difference from `solstice fit` is the Trainer.
- `hand-written loop, loss only` (for information): the same loop written from scratch
  without the experiment: model, BatchNorm state and optax state, the mean cross-entropy,
  and an on-device sum of the loss and of correct predictions instead of the confusion-matrix
  battery.
- `solstice fit`: `Trainer.fit` on `ArrayDataModule(on_device=True, transform=PixelDecode)`,
  no progress bar, no loggers, `log_every_n_steps` = one epoch; timed like an epoch of a long
  run: one `fit` call whose epochs are released one per round (`_fit_gate.EpochGate`).
- `solstice fit (host data)`: the same with the data on the host (`on_device=False`): uint8
  batches gathered on the host and uploaded, decoded inside the step.
"""

import argparse
import functools
import importlib.util
import statistics
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _common import (
    HERE,
    Contestant,
    best_ratio,
    check,
    cpu_ratio,
    machine,
    ratio,
    run,
    spread,
    timed,
)
from _fit_gate import EpochGate
from _resnet import ResNet
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import solstice
from solstice.datamodules import ArrayDataModule, PixelDecode, epoch_permutation

PyTree = Any

NUM_CLASSES = 10
BATCH = "batch"
SEED = 0
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TARGET = 0.95
# One decode object for every contestant and epoch: it is part of the compiled steps' keys.
DECODE = PixelDecode(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))

HAND = "hand-written sharded loop"
LOSS_ONLY = "hand-written loop, loss only"
FIT = "solstice fit"
FIT_HOST = "solstice fit (host data)"


# ---------------------------------------------------------------- data and models
def cifar_like(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """`n` synthetic CIFAR-10-shaped examples: `uint8 (n, 3, 32, 32)` images, each half its
    class's random template and half noise, and `int32 (n,)` labels."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 128, size=(NUM_CLASSES, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    images = rng.integers(0, 128, size=(n, 3, 32, 32), dtype=np.uint8)
    images += templates[labels]
    return images, labels


class ComputeIn(eqx.Module):
    """Runs a stateless model with its floating-point arrays and its input cast to `dtype`
    (mixed precision: the parameters stay float32); the logits come back in float32."""

    model: Any
    dtype: str = eqx.field(static=True)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        model = jax.tree.map(
            lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, self.model
        )
        return model(x.astype(dtype), key=key).astype(jnp.float32)


def load_convnext_example() -> Any:
    """`examples/cifar_convnext.py` as a module (it needs Hydra: the `examples` extra)."""
    path = HERE.parent / "examples" / "cifar_convnext.py"
    spec = importlib.util.spec_from_file_location("cifar_convnext", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise SystemExit(
            f"--model convnext imports {path.name}, which needs {e.name}: "
            "pip install -e '.[examples]'"
        ) from e
    return module


@functools.cache
def model_builder(model: str, dtype: str, smoke: bool):
    """A jitted `key -> (model, state)` (one compilation for all contestants; building layer
    by layer outside `jit` would compile every random draw separately)."""
    if model == "resnet18":
        blocks, widths = ((1, 1), (16, 32)) if smoke else ((2, 2, 2, 2), (64, 128, 256, 512))

        def build(key):
            return eqx.nn.make_with_state(ResNet)(NUM_CLASSES, blocks, widths, dtype=dtype, key=key)

    else:
        example = load_convnext_example()
        depths, dims = ((1, 1), (16, 32)) if smoke else ((2, 2, 6, 2), (64, 128, 256, 512))

        def build(key):
            build_key, init_key = jr.split(key)
            net = example.ConvNeXt(NUM_CLASSES, depths, dims, patch_size=2, key=build_key)
            net = example.trunc_normal_init(net, init_key)
            return (net if dtype == "float32" else ComputeIn(net, dtype)), None

    return eqx.filter_jit(build)


def make_experiment(args) -> solstice.ClassificationExperiment:
    """A fresh experiment (new buffers: contestants donate theirs), the same for everyone."""
    model, state = model_builder(args.model, args.dtype, args.smoke)(jr.key(SEED))
    transformation = optax.chain(
        optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM, nesterov=True)
    )
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(transformation, model), NUM_CLASSES, state=state
    )


def trained_arrays(experiment: solstice.ClassificationExperiment) -> list[np.ndarray]:
    """The model's parameters and BatchNorm state, on the host."""
    return [
        np.asarray(a)
        for a in jax.tree.leaves(eqx.filter((experiment.model, experiment.state), eqx.is_array))
    ]


# ---------------------------------------------------------------- hand-written loops
class ShardedData:
    """The dataset on the devices, the mesh, and the shardings a hand-written loop uses."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int):
        self.mesh = Mesh(np.asarray(jax.devices()), (BATCH,))
        self.replicated = NamedSharding(self.mesh, P())
        self.by_example = NamedSharding(self.mesh, P(BATCH))
        self.arrays = jax.device_put({"image": images, "label": labels}, self.replicated)
        self.num_examples = len(labels)
        self.batch_size = batch_size
        self.steps = self.num_examples // batch_size

    def epoch_order(self, epoch: int) -> jax.Array:
        """Epoch `epoch`'s batches of example indices, `(steps, batch_size)`, on the devices."""
        order = epoch_permutation(self.num_examples, SEED, epoch)[: self.steps * self.batch_size]
        order = order.astype(np.int32).reshape(self.steps, self.batch_size)
        return jax.device_put(order, NamedSharding(self.mesh, P(None, BATCH)))

    def counter(self) -> jax.Array:
        return jax.device_put(np.int32(0), self.replicated)

    def batch(self, arrays: PyTree, order: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
        """Traced: batch `b` of the epoch, gathered, decoded and split over the devices."""
        idx = order[b]
        batch = {k: v.at[idx].get(mode="promise_in_bounds") for k, v in arrays.items()}
        return jax.lax.with_sharding_constraint(DECODE(batch), self.by_example)


def sharded_loop(args, data: ShardedData) -> tuple[Contestant, Any]:
    """The experiment's own `train_step` and metric accumulation in a hand-written jitted,
    donated, data-parallel step; the batch gathered on the devices; one wait per epoch."""
    dyn, static = eqx.partition(make_experiment(args), eqx.is_array)
    dyn = jax.device_put(dyn, data.replicated)

    def step(dyn, acc, arrays, order, b):
        new, metrics = eqx.combine(dyn, static).train_step(data.batch(arrays, order, b))
        new_dyn = jax.lax.with_sharding_constraint(eqx.filter(new, eqx.is_array), data.replicated)
        return new_dyn, acc.merge(metrics), b + 1

    step = jax.jit(step, donate_argnums=(0, 1))
    empty = jax.jit(
        lambda: solstice.ClassificationMetrics.empty(NUM_CLASSES), out_shardings=data.replicated
    )
    compute = jax.jit(lambda acc: acc.compute())
    state = {"dyn": dyn, "epoch": 0}

    def epoch() -> int:
        dyn, acc, b = state["dyn"], empty(), data.counter()
        order = data.epoch_order(state["epoch"])
        for _ in range(data.steps):
            dyn, acc, b = step(dyn, acc, data.arrays, order, b)
        metrics = compute(acc)
        jax.block_until_ready((dyn, metrics))
        state.update(dyn=dyn, epoch=state["epoch"] + 1, metrics=metrics)
        return data.steps * data.batch_size

    epoch()  # warm-up: compile
    return Contestant(HAND, timed(epoch)), lambda: eqx.combine(state["dyn"], static)


def loss_only_loop(args, data: ShardedData) -> tuple[Contestant, Any]:
    """The same loop written from scratch: model, BatchNorm state and optax state, the mean
    cross-entropy, and on-device sums of the loss and of correct predictions."""
    experiment = make_experiment(args)
    params, static = eqx.partition(experiment.model, eqx.is_array)
    transformation = experiment.optimizer.transformation
    carry = {
        "params": params,
        "state": experiment.state,
        "opt_state": experiment.optimizer.opt_state,
    }
    carry = jax.device_put(carry, data.replicated)

    def loss_fn(params, model_state, images, labels):
        model = eqx.combine(params, static)
        if model_state is None:
            logits = jax.vmap(model)(images)
        else:
            logits, model_state = jax.vmap(
                model, axis_name=BATCH, in_axes=(0, None), out_axes=(0, None)
            )(images, model_state)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (model_state, logits)

    def step(carry, totals, arrays, order, b):
        batch = data.batch(arrays, order, b)
        images, labels = batch["image"], batch["label"]
        (loss, (model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            carry["params"], carry["state"], images, labels
        )
        updates, opt_state = transformation.update(grads, carry["opt_state"], carry["params"])
        params = eqx.apply_updates(carry["params"], updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        totals = totals + jnp.stack([loss * labels.shape[0], correct])
        new = {"params": params, "state": model_state, "opt_state": opt_state}
        return jax.lax.with_sharding_constraint(new, data.replicated), totals, b + 1

    step = jax.jit(step, donate_argnums=(0, 1))
    zeros = jax.jit(lambda: jnp.zeros((2,), jnp.float32), out_shardings=data.replicated)
    state = {"carry": carry, "epoch": 0}

    def epoch() -> int:
        carry, totals, b = state["carry"], zeros(), data.counter()
        order = data.epoch_order(state["epoch"])
        for _ in range(data.steps):
            carry, totals, b = step(carry, totals, data.arrays, order, b)
        jax.block_until_ready((carry, totals))
        state.update(carry=carry, epoch=state["epoch"] + 1, totals=totals)
        return data.steps * data.batch_size

    def trained():
        carry = state["carry"]
        return eqx.tree_at(
            lambda e: (e.model, e.state),
            experiment,
            (eqx.combine(carry["params"], static), carry["state"]),
            is_leaf=lambda x: x is None,
        )

    epoch()  # warm-up: compile
    return Contestant(LOSS_ONLY, timed(epoch)), trained


# ---------------------------------------------------------------- Solstice
def solstice_fit(args, images, labels, *, on_device: bool) -> tuple[Contestant, Any]:
    """`Trainer.fit`, timed per epoch of one running `fit` (see `EpochGate`)."""
    dm = ArrayDataModule(
        train={"image": images, "label": labels},
        batch_size=args.batch_size,
        on_device=on_device,
        transform=DECODE,
    )
    steps = len(labels) // args.batch_size
    gate = EpochGate()
    trainer = solstice.Trainer(
        max_epochs=10**6,
        enable_progress_bar=False,
        loggers=[],
        log_every_n_steps=steps,
        devices="auto",
        callbacks=[gate],
    )
    contestant = gate.contestant(
        FIT if on_device else FIT_HOST, trainer, make_experiment(args), dm, steps * args.batch_size
    )
    return contestant, lambda: trainer.experiment


# ---------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet18", "convnext"], default="resnet18")
    parser.add_argument("--batch-size", type=int, default=None, help="global (default 256)")
    parser.add_argument("--samples", type=int, default=None, help="default 50,000")
    parser.add_argument("--rounds", type=int, default=None, help="default 7")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-host", action="store_true", help=f"skip `{FIT_HOST}`")
    parser.add_argument("--no-loss-only", action="store_true", help=f"skip `{LOSS_ONLY}`")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="two narrow stages of one block, 512 samples, batch 64, 2 rounds",
    )
    args = parser.parse_args(argv)
    small, full = (64, 512, 2), (256, 50_000, 7)
    defaults = small if args.smoke else full
    for name, default in zip(("batch_size", "samples", "rounds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def describe_devices() -> str:
    devices = jax.devices()
    return f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"


def ratio_line(by: dict[str, Contestant], a: str, b: str, target: float | None = None) -> str:
    """`a / b` speed: the median of per-round ratios, then the range of rounds, the ratio of
    the best rounds and of images per host CPU second."""
    if a not in by or b not in by:
        return f"{a} / {b}: not measured"
    value = ratio(by[a], by[b])
    lo, hi = spread(by[a], by[b])
    label = f"{a} / {b}"
    head = f"{label:<58} {value:6.3f}x" if target is None else check(label, value, target)
    return head + (
        f"   (rounds {lo:.3f}-{hi:.3f}; best/best {best_ratio(by[a], by[b]):.3f}x; "
        f"per host CPU-s {cpu_ratio(by[a], by[b]):.3f}x)"
    )


def same_training(trained: dict[str, Any]) -> dict[str, float]:
    """Per contestant, how far its trained arrays are from the hand-written loop's: the
    largest over arrays of max |difference| / max |value|."""
    reference = trained_arrays(trained[HAND]())
    distances = {}
    for name, get in trained.items():
        if name == HAND:
            continue
        worst = 0.0
        for a, b in zip(trained_arrays(get()), reference, strict=True):
            if b.size:
                diff = float(np.max(np.abs(a.astype(np.float64) - b)))
                worst = max(worst, diff / max(float(np.max(np.abs(b))), 1e-12))
        distances[name] = worst
    return distances


def main(argv: list[str] | None = None) -> dict[str, Contestant]:
    args = parse(argv)
    n_devices = len(jax.devices())
    if args.batch_size % n_devices:
        raise SystemExit(f"--batch-size {args.batch_size} must split over {n_devices} devices")
    if args.samples < args.batch_size:
        raise SystemExit(f"--samples {args.samples} is less than one batch of {args.batch_size}")
    print(f"devices: {describe_devices()}")
    print(f"host: {machine()}")
    print(
        f"model {args.model}{' (smoke: two narrow stages of one block)' if args.smoke else ''}, "
        f"{args.dtype}, global batch {args.batch_size} ({args.batch_size // n_devices} per "
        f"device), {args.samples:,} synthetic uint8 32x32x3 images, "
        f"{args.samples // args.batch_size} steps per epoch",
        flush=True,
    )
    images, labels = cifar_like(args.samples)

    print("warming up (compiling, one epoch each)", flush=True)
    data = ShardedData(images, labels, args.batch_size)
    builders = [(HAND, lambda: sharded_loop(args, data))]
    if not args.no_loss_only:
        builders.append((LOSS_ONLY, lambda: loss_only_loop(args, data)))
    builders.append((FIT, lambda: solstice_fit(args, images, labels, on_device=True)))
    if not args.no_host:
        builders.append((FIT_HOST, lambda: solstice_fit(args, images, labels, on_device=False)))
    contestants, trained = [], {}
    for name, build in builders:
        start = time.perf_counter()
        contestant, trained[name] = build()
        contestants.append(contestant)
        print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    distances = same_training(trained)
    print(
        "same training: after the warm-up epoch, the largest relative difference of the "
        "parameters (and BatchNorm state) from the hand-written loop's: "
        + "; ".join(f"{name} {d:.2e}" for name, d in distances.items()),
        flush=True,
    )

    # A second untimed epoch each, so that no one-time cost lands in the timed rounds.
    for contestant in contestants:
        contestant.epoch()
    by = run(contestants, args.rounds)
    print()
    print(ratio_line(by, FIT, HAND, TARGET))
    if FIT_HOST in by:
        print(ratio_line(by, FIT_HOST, HAND))
    if LOSS_ONLY in by:
        print(ratio_line(by, LOSS_ONLY, HAND))
    rates = {c.name: statistics.median(c.rates) for c in contestants}
    cells = "; ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
    print(
        f"\nRESULT {describe_devices()}, {args.model} {args.dtype} batch {args.batch_size}: "
        f"images/s (median) {cells}; {FIT} / {HAND} {ratio(by[FIT], by[HAND]):.3f}x"
    )
    return by


if __name__ == "__main__":
    main()
