"""Tensor parallelism: per-device memory and time per step of examples/tensor_parallel.py's block.

    python benchmarks/tensor_parallel.py                       # 4 forced CPU devices, mesh 2x2
    python benchmarks/tensor_parallel.py --mesh data=1,model=8 --dim 1024   # e.g. on 8 GPUs

The example's transformer block (self-attention and an MLP over 8 tokens) is trained on
synthetic digit-shaped data by one gated `fit` per contestant (`EpochGate`: an epoch is timed
without fit's set-up), epochs interleaved round after round:

- `1 device`: the whole batch on one device (the reference of the time ratios);
- `data parallel`: the experiment replicated on every device, batches split over all;
- `TP`: the mesh `--mesh`, `TensorParallel` over "model", batches split over "data";
- `TP+FSDP`: the same, and `FullySharded` over "data" on what TP left (`Combined`).

Memory: the bytes of the experiment's parameters and optimizer state that one device holds
(read from the placed arrays' shards on device 0), as a ratio to the replicated experiment.
Time: the median over rounds of each contestant's speed against `1 device` and `data
parallel`. On a CPU host the devices are forced (`XLA_FLAGS`) and share its cores, so the time
ratios there say little about a real accelerator; the memory ratios hold anywhere.
"""

import argparse
import importlib.util
import os
import statistics

# 4 CPU devices, before JAX starts (a GPU/TPU host uses its real devices instead).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import HERE, cpu_ratio, machine, ratio, run  # noqa: E402
from _fit_gate import EpochGate  # noqa: E402

import solstice  # noqa: E402
from solstice.datamodules import ArrayDataModule  # noqa: E402


def example():
    """`examples/tensor_parallel.py` as a module (examples are scripts, not a package)."""
    path = HERE.parent / "examples" / "tensor_parallel.py"
    spec = importlib.util.spec_from_file_location("tensor_parallel_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_like(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 8, 8), dtype=np.float32)
    return {"image": images, "label": rng.integers(0, 10, size=n).astype(np.int32)}


def bytes_per_device(experiment) -> int:
    """Bytes of `experiment`'s arrays held by its first device (shards are even)."""
    total = 0
    for x in jax.tree.leaves(eqx.filter(experiment, eqx.is_array)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue
        total += x.addressable_shards[0].data.nbytes
    return total


class Probe(solstice.callbacks.Callback):
    """Reads the placed experiment's per-device bytes once, at the first epoch's end."""

    def __init__(self):
        self.bytes: int | None = None

    def on_train_epoch_end(self, trainer, experiment):
        if self.bytes is None:
            self.bytes = bytes_per_device(trainer.experiment)


def main() -> None:
    ex = example()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=ex.default_mesh(), help="axis=size pairs")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=2**12, help="FSDP's min_size")
    args = parser.parse_args()
    mesh = ex.parse_mesh(args.mesh)
    print(machine())
    print(
        f"{jax.device_count()} devices ({jax.devices()[0].device_kind}); mesh {mesh}; "
        f"dim {args.dim}, {args.heads} heads, batch {args.batch_size}"
    )

    samples = args.steps * args.batch_size
    data = ArrayDataModule(train=digits_like(samples), batch_size=args.batch_size)
    settings = dict(max_epochs=10**6, enable_progress_bar=False, num_sanity_val_steps=0)
    configs = {
        "1 device": dict(devices=1),
        "data parallel": dict(),
        "TP": dict(mesh=mesh, sharding_rules=ex.sharding_rules(False)),
        "TP+FSDP": dict(mesh=mesh, sharding_rules=ex.sharding_rules(True, args.min_size)),
    }
    contestants, probes = [], {}
    for name, config in configs.items():
        probes[name], gate = Probe(), EpochGate()
        trainer = solstice.Trainer(**settings, **config, callbacks=[probes[name], gate])
        experiment = ex.make_experiment(args.dim, args.heads)
        contestants.append(gate.contestant(name, trainer, experiment, data, samples))
        print(f"  {name}: compiled", flush=True)
    by = run(contestants, args.rounds)

    print("\nper-device bytes of parameters + optimizer state (ratio to replicated):")
    full = probes["data parallel"].bytes
    for name, probe in probes.items():
        print(f"  {name:<14} {probe.bytes:>12,d} B   {probe.bytes / full:.3f}x")
    print("\ntime per step (speed ratios, higher is faster; medians over rounds; the CPU-time")
    print("ratio counts samples per CPU second of this process, which other load disturbs less):")
    for name in configs:
        step = statistics.median(by[name].times) / args.steps * 1e3
        one, dp = by["1 device"], by["data parallel"]
        print(
            f"  {name:<14} {step:8.2f} ms/step   vs 1 device {ratio(by[name], one):.3f}x "
            f"(CPU time {cpu_ratio(by[name], one):.3f}x)   vs data parallel "
            f"{ratio(by[name], dp):.3f}x (CPU time {cpu_ratio(by[name], dp):.3f}x)"
        )


if __name__ == "__main__":
    main()
