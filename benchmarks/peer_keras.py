"""Peer: Keras 3 `fit` on the JAX backend, one epoch per `epoch` line (see `_common.Peer`).

    KERAS_BACKEND=jax python benchmarks/peer_keras.py --hidden 512 512 --batch-size 128

Run by `compute_bound.py` / `overhead_bound.py`; prints `ready` after a warm-up epoch. One
`fit` call runs for as many epochs as asked: a callback holds each epoch until told to go.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import keras
    except ImportError as error:
        print(f"error keras is not installed ({error}); pip install 'solstice[bench]'", flush=True)
        return
    from _common import mnist_like

    if keras.backend.backend() != "jax":
        print(f"error KERAS_BACKEND is {keras.backend.backend()!r}, not 'jax'", flush=True)
        return
    x, y = mnist_like(args.samples)
    layers = [keras.Input((28, 28)), keras.layers.Flatten()]
    layers += [keras.layers.Dense(h, activation="relu") for h in args.hidden]
    layers += [keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=args.steps_per_execution,
    )

    class Gate(keras.callbacks.Callback):
        start = cpu = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            if epoch > 0:  # epoch 0 is the warm-up
                command = sys.stdin.readline().strip()
                if command != "epoch":
                    sys.stdout.flush()
                    os._exit(0)
            self.start = time.perf_counter()
            self.cpu = time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start  # logs are numbers: the device is done
            if epoch == 0:
                print("ready", flush=True)
            else:
                cpu = time.process_time() - self.cpu
                print(f"time {seconds:.6f} {args.samples} {cpu:.6f}", flush=True)

    model.fit(x, y, batch_size=args.batch_size, epochs=10**6, verbose=0, callbacks=[Gate()])


if __name__ == "__main__":
    main()
