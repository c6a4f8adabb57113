"""Cost of logging every step: TensorBoard + CSV + progress bar against no logging.

    python benchmarks/bench_logging.py [--repeats 3] [--samples 30720]

Both runs train the same MLP (784-512-512-10, batch 128) on the same MNIST-shaped random
data, one epoch after a warm-up epoch (so compilation is excluded), side by side in one
process; each configuration is repeated and the median throughput is used. Prints samples/s
and the ratio logged / silent (target: >= 0.95, i.e. logging costs at most 5%).
"""

import argparse
import statistics
import tempfile
import time

import equinox as eqx
import jax
import numpy as np
import optax

import solstice
from solstice.datamodules import ArrayDataModule


def make_experiment():
    key_model, key_exp = jax.random.split(jax.random.key(0))
    model = eqx.nn.MLP(784, 10, 512, 2, key=key_model)
    return solstice.ClassificationExperiment(
        model,
        solstice.OptaxOptimizer(optax.adam(1e-3), model),
        10,
        key=key_exp,
        input_key="image",
    )


def run(datamodule, logged: bool, logdir: str) -> float:
    if logged:
        kw = dict(
            loggers=[solstice.TensorBoardLogger(logdir), solstice.CSVLogger(logdir)],
            log_every_n_steps=1,
            enable_progress_bar=True,
        )
    else:
        kw = dict(loggers=[], log_every_n_steps=10**9, enable_progress_bar=False)
    trainer = solstice.Trainer(max_epochs=2, devices=1, **kw)
    times = {}

    class EpochTimer(solstice.callbacks.Callback):
        def on_train_epoch_start(self, trainer, experiment):
            jax.block_until_ready(trainer._dyn)
            times[trainer.current_epoch] = time.perf_counter()

        def on_train_epoch_end(self, trainer, experiment):
            jax.block_until_ready(trainer._dyn)
            times[trainer.current_epoch] = time.perf_counter() - times[trainer.current_epoch]

    trainer.callbacks.insert(0, EpochTimer())
    trainer.fit(make_experiment(), datamodule)
    trainer.close()
    n = trainer.num_training_batches * datamodule.batch_size
    return n / times[1]  # epoch 1: after warm-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30720)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = {
        "image": rng.random((args.samples, 784), dtype=np.float32),
        "label": rng.integers(0, 10, args.samples).astype(np.int32),
    }
    dm = ArrayDataModule(train=data, batch_size=128)
    silent, logged = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved, so drift affects both alike
            silent.append(run(dm, False, tmp))
            logged.append(run(dm, True, f"{tmp}/{r}"))
    s, lg = statistics.median(silent), statistics.median(logged)
    print(f"no logging:            {s:10.0f} samples/s  (runs: {[round(x) for x in silent]})")
    print(
        f"log every step (TB+CSV+bar): {lg:10.0f} samples/s  (runs: {[round(x) for x in logged]})"
    )
    print(f"ratio logged/silent: {lg / s:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
