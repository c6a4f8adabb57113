"""Grain throughput: `GrainDataModule` against `ArrayDataModule` and `TorchDataModule`.

The same MNIST-shaped data (`float32 (N, 28, 28)` images, `int32` labels) served four ways:

- **array**: `ArrayDataModule` over the arrays in memory (host mode; the reference);
- **grain (array_record)**: `GrainDataModule` over an array_record file (one record per
  sample: the image's bytes then the label's), decoded by a `grain.transforms.Map`;
- **grain (in memory)**: `GrainDataModule` over a list of dict records;
- **torch**: `TorchDataModule(train=TensorDataset(x, y))`, Solstice's torch adapter.

Two measurements, each side by side in one process (`_common.run`: rounds of one epoch per
contestant, in turn; the median of per-round ratios is the headline):

1. **loader**: iterating one training epoch of batches (global batch `--batch-size`,
   shuffled), nothing else;
2. **fit**: one epoch of `Trainer.fit` (an MLP 784-`--hidden`-10, Adam, the classification
   metrics), one running `fit` per contestant released an epoch at a time (`EpochGate`), so the
   data is read on the feeder thread while the step runs, as in training.

    python benchmarks/grain_throughput.py [--samples 20000] [--rounds 5] [--batch-size 128]
                                          [--hidden 64] [--read-threads 4] [--no-fit]
"""

import argparse
import os
import tempfile

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Contestant, best_ratio, cpu_ratio, machine, mnist_like, ratio, run, spread
from _common import timed as timed_epoch
from _fit_gate import EpochGate
from array_record.python.array_record_module import ArrayRecordWriter

import solstice
from solstice.datamodules import ArrayDataModule, GrainDataModule, TorchDataModule


class Decode(grain.transforms.Map):
    """A record (the image's float32 bytes, then the label as int32 bytes) to a dict."""

    def map(self, record):
        image = np.frombuffer(record, np.float32, count=28 * 28).reshape(28, 28)
        return {"image": image, "label": np.frombuffer(record, np.int32, offset=28 * 28 * 4)[0]}


def write_array_record(path: str, x: np.ndarray, y: np.ndarray) -> None:
    writer = ArrayRecordWriter(path, "group_size:1")
    for image, label in zip(x, y):
        writer.write(image.tobytes() + label.tobytes())
    writer.close()


def datamodules(x, y, path, batch_size, read_threads) -> dict:
    import torch
    from torch.utils.data import TensorDataset

    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    records = [{"image": image, "label": label} for image, label in zip(x, y)]
    return {
        "array": lambda: ArrayDataModule(train={"image": x, "label": y}, batch_size=batch_size),
        "grain (array_record)": lambda: GrainDataModule(
            train=path, operations=[Decode()], batch_size=batch_size, read_options=read
        ),
        "grain (in memory)": lambda: GrainDataModule(
            train=records, batch_size=batch_size, read_options=read
        ),
        "torch": lambda: TorchDataModule(
            train=TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size
        ),
    }


def loader_contestant(name: str, make, batch_size: int) -> Contestant:
    dm = make()
    state = {"epoch": 0}

    def epoch() -> int:
        dm.set_epoch(state["epoch"])
        state["epoch"] += 1
        return sum(len(batch["label"]) for batch in dm.train_dataloader())

    epoch()  # warm-up: first reads, page cache
    return Contestant(name, timed_epoch(epoch))


def fit_contestant(name: str, make, hidden: int, samples: int, batch_size: int) -> Contestant:
    mlp = eqx.nn.MLP(28 * 28, 10, hidden, 1, activation=jax.nn.relu, key=jax.random.key(0))
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    experiment = solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(1e-3), model), num_classes=10
    )
    steps = samples // batch_size
    gate = EpochGate()
    trainer = gate.trainer(steps)
    contestant = gate.contestant(name, trainer, experiment, make(), steps * batch_size, timed_epoch)
    return contestant


def ratios(results: dict[str, Contestant], title: str) -> None:
    print(f"\n{title}: speed ratios (median of rounds, range; best/best; per CPU-s)")
    for name in ("grain (array_record)", "grain (in memory)"):
        for ref in ("array", "torch"):
            a, b = results[name], results[ref]
            lo, hi = spread(a, b)
            print(
                f"  {name:<21} / {ref:<6} {ratio(a, b):7.3f} ({lo:.3f}-{hi:.3f}); "
                f"{best_ratio(a, b):.3f}; {cpu_ratio(a, b):.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--no-fit", action="store_true")
    args = parser.parse_args()
    print(machine())
    print(
        f"grain {grain.__version__}; {args.samples} samples 28x28 float32, batch "
        f"{args.batch_size}, Grain read threads {args.read_threads}"
    )
    x, y = mnist_like(args.samples)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train.array_record")
        write_array_record(path, x, y)
        makes = datamodules(x, y, path, args.batch_size, args.read_threads)
        print("\n== 1. loader: one training epoch of batches")
        contestants = [loader_contestant(n, make, args.batch_size) for n, make in makes.items()]
        ratios(run(contestants, args.rounds), "loader")
        if not args.no_fit:
            print(f"\n== 2. fit: one epoch of Trainer.fit, MLP 784-{args.hidden}-10")
            contestants = [
                fit_contestant(n, make, args.hidden, args.samples, args.batch_size)
                for n, make in makes.items()
            ]
            ratios(run(contestants, args.rounds), "fit")


if __name__ == "__main__":
    main()
