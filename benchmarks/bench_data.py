"""Data-loading throughput: Solstice's built-ins against torch's DataLoader, host vs device.

Writes synthetic MNIST-shaped IDX files (60,000 + 10,000 images) to a temporary directory,
then measures, side by side in one run:

1. batches/s of the built-in `MNIST` module (host mode, shuffled training split, each batch a
   fresh `{"image": float32 (B, 1, 28, 28) in [0, 1], "label": int32 (B,)}` decoded from the
   stored `uint8` pixels) and of `ArrayDataModule` on the same images as float32, against
   `torch.utils.data.DataLoader(TensorDataset(...), batch_size=128, shuffle=True)` on those
   float32 arrays; and, as the Trainer reads MNIST (the batches before the decode, which
   the Trainer runs inside its compiled step: `split_transform()`), `uint8` batches against
   torch's `DataLoader` on the same `uint8` arrays. Every contestant iterates whole epochs (torch's included, so that each
   pays its per-epoch shuffle once per epoch). The rounds are interleaved; in each, every
   contestant runs an untimed epoch then a timed one (the 47 MB of uint8 pixels partly stay
   in the CPU's last-level cache between epochs, until torch's 188 MB of float32 flush
   them). The best rate of each and the median and range of the per-round ratios are
   printed.
2. training throughput of a jitted SGD step (a small MLP) fed by `MNIST` in host mode
   (each batch `jax.device_put`, then the step) against device mode run the way the Trainer
   runs it: `on_device=True` keeps the split on the device and the step gathers its own
   batch (`device_epoch()`'s `DeviceGather` inside the jitted step, one dispatch per step,
   the step counter on the device). For reference it also times iterating the device
   loader (`DeviceBatchLoader`, one gather dispatch per batch) into the same step.

Run: `python benchmarks/bench_data.py [--batch-size 128] [--repeats 3]`.
"""

import argparse
import collections
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from solstice.datamodules import MNIST, ArrayDataModule
from solstice.datamodules._device import default_mesh
from solstice.datamodules._idx import write_idx


def write_fake_mnist(root: str, n_train: int = 60_000, n_test: int = 10_000) -> None:
    rng = np.random.default_rng(0)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            os.path.join(raw, f"{prefix}-images-idx3-ubyte"),
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(
            os.path.join(raw, f"{prefix}-labels-idx1-ubyte"),
            rng.integers(0, 10, (n,), dtype=np.uint8),
        )


def interleaved_rates(
    fns: dict[str, Callable[[], int]], repeats: int, *, warm: bool = False
) -> dict[str, list[float]]:
    """`repeats` rounds; in each, every `fn() -> number of batches` runs once, in turn (the
    first one rotating), after one untimed run if `warm` (so that no contestant is timed on
    caches its predecessor flushed). Returns each one's batches/s per round."""
    names = list(fns)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if warm:
                fns[name]()
            start = time.perf_counter()
            n = fns[name]()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def iterate(loader_fn):
    def run():
        n = 0
        for _ in loader_fn():
            n += 1
        return n

    return run


def summary(rates: dict[str, list[float]], name: str, ref: str) -> str:
    best = max(rates[name])
    ratios = [a / b for a, b in zip(rates[name], rates[ref])]
    return (
        f"{best:10.0f}   {best / max(rates[ref]):6.1f}x   "
        f"(per round {statistics.median(ratios):5.1f}x, {min(ratios):.1f}-{max(ratios):.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bs = args.batch_size

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"torch {torch.__version__}; {os.cpu_count()} CPU cores; batch size {bs}; "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )

    with tempfile.TemporaryDirectory() as root:
        write_fake_mnist(root)
        mnist = MNIST(root, batch_size=bs, val_fraction=0.0, download=False)
        t = time.perf_counter()
        mnist.setup("fit")
        print(f"MNIST.setup (parse 4 IDX files, 70k images): {time.perf_counter() - t:.2f} s")
        train = mnist.splits["train"]
        images = (train["image"].astype(np.float32) / np.float32(255)).copy()
        labels = train["label"]

        # -- 1. loaders alone -------------------------------------------------------------
        arrays = ArrayDataModule(train={"image": images, "label": labels}, batch_size=bs)
        torch_loader = DataLoader(
            TensorDataset(torch.from_numpy(images), torch.from_numpy(labels).long()),
            batch_size=bs,
            shuffle=True,
            drop_last=True,
        )
        torch_uint8 = DataLoader(
            TensorDataset(torch.from_numpy(train["image"]), torch.from_numpy(labels).long()),
            batch_size=bs,
            shuffle=True,
            drop_last=True,
        )
        rates = interleaved_rates(
            {
                "mnist": iterate(mnist.train_dataloader),
                "mnist_trainer": iterate(lambda: mnist.train_dataloader().split_transform()[0]),
                "arrays": iterate(arrays.train_dataloader),
                "torch": iterate(lambda: torch_loader),
                "torch_uint8": iterate(lambda: torch_uint8),
            },
            args.repeats,
            warm=True,
        )
        print(
            f"\n1. Iterating training batches (batches/s, best of {args.repeats} epochs; "
            "x torch: best/best, and the median and range of per-round ratios)"
        )
        print(
            f"   solstice MNIST (uint8 -> float32 per batch)   {summary(rates, 'mnist', 'torch')}"
        )
        print(
            f"   solstice ArrayDataModule (float32 arrays)     {summary(rates, 'arrays', 'torch')}"
        )
        print(
            f"   torch DataLoader(TensorDataset, shuffle=True) {max(rates['torch']):10.0f}      1.0x"
        )
        print(
            "   the same uint8 pixels as the Trainer takes them (MNIST's decode runs inside "
            "the compiled step):"
        )
        print(
            "   solstice MNIST (uint8 batches)                "
            f"{summary(rates, 'mnist_trainer', 'torch_uint8')}"
        )
        print(
            "   torch DataLoader(TensorDataset(uint8), ...)   "
            f"{max(rates['torch_uint8']):10.0f}      1.0x"
        )

        # -- 2. host vs device mode, feeding a jitted training step ----------------------
        mesh = default_mesh()
        sharding = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        key1, key2 = jax.random.split(jax.random.key(0))
        params = jax.device_put(
            {
                "w1": jax.random.normal(key1, (784, 256), jnp.float32) * 0.03,
                "w2": jax.random.normal(key2, (256, 10), jnp.float32) * 0.06,
            },
            replicated,
        )

        def sgd(params, batch):
            def loss_fn(p):
                x = batch["image"].reshape(batch["image"].shape[0], -1)
                logits = jax.nn.relu(x @ p["w1"]) @ p["w2"]
                onehot = jax.nn.one_hot(batch["label"], 10, dtype=jnp.float32)
                return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, axis=-1))

            grads = jax.grad(loss_fn)(params)
            return jax.tree.map(lambda p, g: p - jnp.float32(0.1) * g, params, grads)

        step = jax.jit(sgd)

        @functools.partial(jax.jit, static_argnums=0)
        def gather_step(gather, params, data, i):
            """The Trainer's device mode: the step gathers batch `i` itself."""
            return sgd(params, gather(data, i)), i + 1

        def bounded(outputs: collections.deque, out, limit: int = 8) -> None:
            # Like the Trainer's InflightLimit: at most `limit` steps dispatched, unfinished.
            outputs.append(out)
            if len(outputs) > limit:
                jax.block_until_ready(outputs.popleft())

        def host_train():
            p, n, inflight = params, 0, collections.deque()
            for batch in mnist.train_dataloader():
                p = step(p, jax.device_put(batch, sharding))
                bounded(inflight, p)
                n += 1
            jax.block_until_ready(p)
            return n

        def device_iterate_train():
            p, n, inflight = params, 0, collections.deque()
            for batch in on_device.train_dataloader():  # already sharded on the devices
                p = step(p, batch)
                bounded(inflight, p)
                n += 1
            jax.block_until_ready(p)
            return n

        def device_gather_train():
            loader = on_device.train_dataloader()
            gather, data = loader.device_epoch(first_step=0)
            p, i, inflight = params, jax.device_put(np.int32(0), replicated), collections.deque()
            for _ in range(len(loader)):
                p, i = gather_step(gather, p, data, i)
                bounded(inflight, i)
            jax.block_until_ready(p)
            return len(loader)

        on_device = MNIST(root, batch_size=bs, val_fraction=0.0, download=False, on_device=True)
        on_device.setup("fit")
        runs = {
            "host": host_train,
            "device_gather": device_gather_train,
            "device_iterate": device_iterate_train,
        }
        for run in runs.values():
            run()  # compile and warm up
        rates = interleaved_rates(runs, args.repeats)
        host = max(rates["host"])
        print(f"\n2. MNIST feeding a jitted MLP SGD step (steps/s, best of {args.repeats} epochs)")
        print(f"   host mode (BatchLoader, device_put per batch, step)     {host:8.0f}    1.00x")
        for name, label in (
            ("device_gather", "device mode (on_device=True, gather inside the step)"),
            ("device_iterate", "device loader iterated (gather dispatch, then step)"),
        ):
            best = max(rates[name])
            ratios = [a / b for a, b in zip(rates[name], rates["host"])]
            print(
                f"   {label:<55} {best:8.0f}   {best / host:5.2f}x host "
                f"(per round {statistics.median(ratios):.2f}x)"
            )


if __name__ == "__main__":
    main()
