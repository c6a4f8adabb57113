"""Data-loading throughput: Solstice's built-ins against torch's DataLoader, host vs device.

Writes synthetic MNIST-shaped IDX files (60,000 + 10,000 images) to a temporary directory,
then measures, side by side in one run:

1. batches/s of the built-in `MNIST` module (host mode, decoding to float32 per batch) and
   of `ArrayDataModule` on the same float32 arrays, against
   `torch.utils.data.DataLoader(TensorDataset(...), batch_size=128, shuffle=True)` on those
   float32 arrays;
2. training-step throughput when every batch is placed on the devices and consumed by a
   jitted step (a small MLP's SGD update), with the data in host mode
   (`jax.device_put` per batch) against device mode (`on_device=True`).

Run: `python benchmarks/bench_data.py [--batch-size 128] [--repeats 3]`.
"""

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from solstice.datamodules import MNIST, ArrayDataModule
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


def best_rate(fn, repeats: int) -> float:
    """Best of `repeats` runs of `fn() -> number of batches`, in batches per second."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def iterate(loader_fn, limit: int | None = None):
    def run():
        n = 0
        for _ in loader_fn():
            n += 1
            if limit is not None and n == limit:
                break
        return n

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-batches", type=int, default=100)
    args = parser.parse_args()
    bs = args.batch_size

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"torch {torch.__version__}; {os.cpu_count()} CPU cores; batch size {bs}"
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
        rate_mnist = best_rate(iterate(mnist.train_dataloader), args.repeats)
        rate_arrays = best_rate(iterate(arrays.train_dataloader), args.repeats)
        rate_torch = best_rate(iterate(lambda: torch_loader, args.torch_batches), args.repeats)
        print(f"\n1. Iterating training batches (batches/s, best of {args.repeats})")
        print(
            f"   solstice MNIST (uint8 -> float32 per batch)   {rate_mnist:10.0f}"
            f"   {rate_mnist / rate_torch:6.1f}x torch"
        )
        print(
            f"   solstice ArrayDataModule (float32 arrays)     {rate_arrays:10.0f}"
            f"   {rate_arrays / rate_torch:6.1f}x torch"
        )
        print(f"   torch DataLoader(TensorDataset, shuffle=True) {rate_torch:10.0f}    1.0x")

        # -- 2. host vs device mode, feeding a jitted training step ----------------------
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
        sharding = NamedSharding(mesh, PartitionSpec("batch"))
        key1, key2 = jax.random.split(jax.random.key(0))
        params = {
            "w1": jax.random.normal(key1, (784, 256), jnp.float32) * 0.03,
            "w2": jax.random.normal(key2, (256, 10), jnp.float32) * 0.06,
        }

        @jax.jit
        def step(params, batch):
            def loss_fn(p):
                x = batch["image"].reshape(batch["image"].shape[0], -1)
                logits = jax.nn.relu(x @ p["w1"]) @ p["w2"]
                onehot = jax.nn.one_hot(batch["label"], 10, dtype=jnp.float32)
                return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, axis=-1))

            grads = jax.grad(loss_fn)(params)
            return jax.tree.map(lambda p, g: p - jnp.float32(0.1) * g, params, grads)

        def train_epoch(dm):
            def run():
                p = params
                n = 0
                for batch in dm.train_dataloader():
                    p = step(p, jax.device_put(batch, sharding))
                    n += 1
                jax.block_until_ready(p)
                return n

            return run

        def consume_epoch(dm):
            def run():
                n, last = 0, None
                for batch in dm.train_dataloader():
                    last = jax.device_put(batch, sharding)
                    n += 1
                jax.block_until_ready(last)
                return n

            return run

        on_device = MNIST(root, batch_size=bs, val_fraction=0.0, download=False, on_device=True)
        on_device.setup("fit")
        for run in (
            consume_epoch(mnist),
            consume_epoch(on_device),
            train_epoch(mnist),
            train_epoch(on_device),
        ):
            run()  # compile and warm up
        host_put = best_rate(consume_epoch(mnist), args.repeats)
        device_put = best_rate(consume_epoch(on_device), args.repeats)
        host_train = best_rate(train_epoch(mnist), args.repeats)
        device_train = best_rate(train_epoch(on_device), args.repeats)
        print(f"\n2. MNIST batches placed on the devices (batches/s, best of {args.repeats})")
        print(
            f"   iterate + device_put:         host {host_put:8.0f}   device {device_put:8.0f}"
            f"   device/host {device_put / host_put:5.2f}x"
        )
        print(
            f"   + jitted MLP training step:   host {host_train:8.0f}   device {device_train:8.0f}"
            f"   device/host {device_train / host_train:5.2f}x"
        )


if __name__ == "__main__":
    main()
