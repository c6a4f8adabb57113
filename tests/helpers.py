"""Small experiments and data shared by the tests."""

import dataclasses
import typing

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import solstice
from solstice.datamodules import ArrayDataModule


def make_mlp_experiment(
    seed: int = 0, in_size: int = 64, num_classes: int = 10, lr: float = 3e-3, width: int = 32
):
    key_model, key_exp = jax.random.split(jax.random.key(seed))
    mlp = eqx.nn.MLP(in_size, num_classes, width, 1, key=key_model)
    model = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(lr), model), num_classes=num_classes, key=key_exp
    )


def blobs(n: int, num_classes: int = 4, dim: int = 8, seed: int = 0):
    """Linearly separable-ish Gaussian blobs: `{"image": (n, dim) float32, "label": (n,) int32}`."""
    centers = np.random.default_rng(1234).normal(size=(num_classes, dim)).astype(np.float32) * 3
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    x = centers[labels] + rng.normal(size=(n, dim)).astype(np.float32)
    return {"image": x, "label": labels}


def blobs_datamodule(n_train=256, n_val=70, batch_size=32, eval_batch_size=None, seed=0, **kw):
    return ArrayDataModule(
        train=blobs(n_train, seed=seed),
        val=blobs(n_val, seed=seed + 1),
        test=blobs(n_val, seed=seed + 2),
        predict=blobs(n_val, seed=seed + 3),
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        **kw,
    )


# ---------------------------------------------------------------------- a user's experiment
class SquaredError(solstice.Metrics):
    """Mean squared error: a sum and a count, both arrays."""

    total: jax.Array
    count: jax.Array

    def __init__(self, errors):
        self.total = jnp.sum(errors**2)
        self.count = jnp.asarray(errors.size, jnp.float32)

    def merge(self, other):
        return eqx.tree_at(
            lambda m: (m.total, m.count), self, (self.total + other.total, self.count + other.count)
        )

    def compute(self):
        return {"mse": self.total / self.count}


class XY(typing.NamedTuple):
    x: np.ndarray
    y: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Record:
    x: np.ndarray
    y: np.ndarray


# How each batch structure stores (x, y), and how to read them back.
STRUCTURES = {
    "tuple": (lambda x, y: (x, y), lambda b: (b[0], b[1])),
    "list": (lambda x, y: [x, y], lambda b: (b[0], b[1])),
    "namedtuple": (lambda x, y: XY(x, y), lambda b: (b.x, b.y)),
    "nested_dict": (lambda x, y: {"in": {"x": x}, "out": y}, lambda b: (b["in"]["x"], b["out"])),
    "dataclass": (lambda x, y: Record(x, y), lambda b: (b.x, b.y)),
}


class Regression(solstice.Experiment):
    """A user's experiment: knows nothing of masks or padding."""

    model: eqx.nn.Linear
    optimizer: solstice.Optimizer
    structure: str = eqx.field(static=True)

    def _xy(self, batch):
        return STRUCTURES[self.structure][1](batch)

    def _errors(self, model, batch):
        x, y = self._xy(batch)
        return jax.vmap(model)(x)[:, 0] - y

    def train_step(self, batch):
        def loss(model):
            return jnp.mean(self._errors(model, batch) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(self.model)
        updates, optimizer = self.optimizer(grads, eqx.filter(self.model, eqx.is_array))
        model = eqx.apply_updates(self.model, updates)
        new = eqx.tree_at(lambda e: (e.model, e.optimizer), self, (model, optimizer))
        return new, SquaredError(jnp.sqrt(value)[None])

    def eval_step(self, batch):
        return SquaredError(self._errors(self.model, batch))

    def predict_step(self, batch):
        x, _ = self._xy(batch)
        return {"prediction": jax.vmap(self.model)(x)[:, 0], "input": x}


class NoOptimizer(solstice.Experiment):
    """Updates its weights by hand: no `solstice.Optimizer` for the Trainer to tap."""

    w: jax.Array

    def train_step(self, batch):
        x, y = batch
        grad = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(self.w)
        return NoOptimizer(self.w - 0.1 * grad), SquaredError(grad)

    def eval_step(self, batch):
        return SquaredError(jnp.zeros(1))


def regression(structure="tuple", seed=0, lr=0.05):
    model = eqx.nn.Linear(3, 1, key=jax.random.key(seed))
    return Regression(model, solstice.OptaxOptimizer(optax.sgd(lr), model), structure)


def regression_split(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    return x, y


def mse_by_hand(experiment, x, y):
    pred = np.asarray(jax.vmap(experiment.model)(jnp.asarray(x))[:, 0])
    return float(np.mean((pred.astype(np.float64) - y) ** 2))


def params_of(experiment):
    return jax.tree.leaves(eqx.filter(experiment.model, eqx.is_array))


def run_processes(commands, *, env, timeout, cwd=None):
    """Run one subprocess per command together; wait for all, kill leftovers, and assert each
    exited 0 (showing every process's output otherwise). Returns their outputs."""
    import subprocess

    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd in commands
    ]
    import time

    deadline = time.monotonic() + timeout
    logs, hung = [], []
    for i, p in enumerate(procs):
        try:
            logs.append(p.communicate(timeout=max(0.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            # A hang (e.g. processes waiting for each other at a collective): kill it and show
            # what every process printed, instead of a bare TimeoutExpired.
            if p.poll() is None:
                p.kill()
                hung.append(i)
            logs.append(p.communicate()[0])
    outputs = "\n".join(f"--- process {i} ---\n{log}" for i, log in enumerate(logs))
    assert not hung, f"process(es) {hung} still running after {timeout} s:\n{outputs}"
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outputs}"
    return logs


def packed_like_trainer(metrics: dict, epoch: int = 0, prefix: str = "train/"):
    """A `PackedMetrics` as the Trainer publishes it: `metrics` packed inside a compiled
    function (the names come from the trace: a dict's keys come sorted), prefixed, with
    `epoch` added."""
    from solstice.loggers._packed import PackedMetrics, pack_scalars

    names = []

    def pack(m):
        packed_names, vector, rest = pack_scalars(m)
        names.append(packed_names)
        return vector, rest

    vector, rest = jax.jit(pack)(metrics)
    return PackedMetrics(names[0], vector, rest, prefix=prefix).with_items(epoch=epoch)


def join_local_processes(
    process_id: int, num_processes: int, port: int, devices_per_process: int
) -> None:
    """Make this process one of `num_processes` local processes of one JAX run (on
    127.0.0.1:`port`, gloo CPU collectives, `devices_per_process` CPU devices each). Call it
    first in a worker, before anything touches a device."""
    jax.config.update("jax_num_cpu_devices", devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
