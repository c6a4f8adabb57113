"""The MLP training benchmark shared by `compute_bound.py` and `overhead_bound.py`.

Contestants (each trains the same MLP with Adam on the same MNIST-shaped data):

- `limit`: the experiment's `train_step` plus the merge of its metrics into an on-device
  accumulator (the work Solstice's compiled step does), `jax.jit` with donation, in a bare
  Python loop on one batch already on the device. Nothing else runs.
- `limit K=k`: the same, `k` steps per call with `lax.scan` (what `steps_per_execution` fuses).
- `limit (fresh batches)`, `limit K=k (fresh batches)`: the same with a new batch every step,
  gathered in the step from the dataset on the device (for information: what reading real
  data costs; the targets are against the limits on one batch).
- `solstice fit`: `Trainer.fit`, host data (`ArrayDataModule`), no progress bar, no
  loggers, `log_every_n_steps` = a whole epoch: raw speed. Timed like the peers: epochs of
  one running `fit`, released one at a time (`EpochGate`).
- `solstice fit (on_device)`: the same, the data uploaded once (`on_device=True`).
- `solstice fit K=k`: `steps_per_execution=k`.
- `... (fit per epoch)`: one `fit` call per epoch instead, which adds `fit`'s set-up.
- `solstice fit (defaults)`: `Trainer(max_epochs=...)` with its defaults (progress bar,
  `log_every_n_steps=50`), to show what they cost.
- `naive eqx loop`: what a researcher writes by hand: `eqx.filter_jit` step, a numpy batch
  per step, `float(loss)` per step.
- `keras fit (jax)`, `lightning (cpu torch)`: the peers, each in its own process.
"""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import (
    Contestant,
    Peer,
    best_ratio,
    check,
    cpu_ratio,
    machine,
    mnist_like,
    ratio,
    spread,
    timed,
)
from _fit_gate import EpochGate

import solstice
from solstice.datamodules import ArrayDataModule
from solstice.trainer._placement import Placement

LR = 1e-3


def make_model(hidden: list[int], key: jax.Array) -> eqx.Module:
    mlp = eqx.nn.MLP(28 * 28, 10, hidden[0], len(hidden), activation=jax.nn.relu, key=key)
    if len(set(hidden)) != 1:
        raise ValueError(f"eqx.nn.MLP takes one width, got {hidden}")
    return eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), mlp])


def make_experiment(hidden: list[int]) -> solstice.ClassificationExperiment:
    model = make_model(hidden, jax.random.key(0))
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(LR), model), num_classes=10
    )


# ---------------------------------------------------------------- Solstice
def limit(hidden, x, y, batch_size, k=1, fresh=False) -> Contestant:
    """The experiment's own `train_step` (with its metrics merged into an accumulator, as
    Solstice's compiled step does), jitted with donation, in a bare loop on one batch that is
    already on the device. With `k > 1`, `k` steps per call with `lax.scan`.

    `fresh`: not one batch but a new one every step, gathered inside the step from the whole
    dataset on the device by an on-device counter, in a shuffled order (the cost of reading
    real data, which a batch that stays in the CPU's caches does not pay)."""
    placement = Placement(1)
    exp = make_experiment(hidden)
    dyn, static = eqx.partition(exp, eqx.is_array)
    dyn = placement.replicate(dyn)
    n_steps = len(x) // batch_size
    order = np.random.default_rng(0).permutation(len(x))[: n_steps * batch_size]
    order = placement.replicate(order.reshape(n_steps, batch_size).astype(np.int32))
    data = placement.replicate({"image": x, "label": y})

    def batch_at(data, order, b):
        idx = order[b % n_steps]
        return jax.tree.map(lambda a: a.at[idx].get(mode="promise_in_bounds"), data)

    def body(dyn, acc, batch):
        new, metrics = eqx.combine(dyn, static).train_step(batch)
        return eqx.filter(new, eqx.is_array), acc.merge(metrics)

    def body_fresh(dyn, acc, data, order, b):
        return (*body(dyn, acc, batch_at(data, order, b)), b + 1)

    def many(dyn, acc, batches):
        def scan_body(carry, batch):
            return body(*carry, batch), None

        return jax.lax.scan(scan_body, (dyn, acc), batches)[0]

    def many_fresh(dyn, acc, data, order, b):
        def scan_body(carry, _):
            return body_fresh(*carry[:2], data, order, carry[2]), None

        return jax.lax.scan(scan_body, (dyn, acc, b), None, length=k)[0]

    one = {"image": x[:batch_size], "label": y[:batch_size]}
    batch = placement.put_batch(one)
    stacked = placement.put_stacked_batches(jax.tree.map(lambda a: np.stack([a] * k), one))
    shapes = jax.eval_shape(lambda d, b: eqx.combine(d, static).train_step(b)[1], dyn, batch)
    acc = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    if fresh:
        single = jax.jit(body_fresh, donate_argnums=(0, 1))
        fused = jax.jit(many_fresh, donate_argnums=(0, 1))
        step = lambda dyn, acc, b: single(dyn, acc, data, order, b)  # noqa: E731
        steps = lambda dyn, acc, b: fused(dyn, acc, data, order, b)  # noqa: E731
    else:
        single = jax.jit(body, donate_argnums=(0, 1))
        fused = jax.jit(many, donate_argnums=(0, 1))
        step = lambda dyn, acc, b: (*single(dyn, acc, batch), b)  # noqa: E731
        steps = lambda dyn, acc, b: (*fused(dyn, acc, stacked), b)  # noqa: E731
    state = {"dyn": dyn, "acc": acc}

    def epoch() -> int:
        dyn, acc = state["dyn"], state["acc"]
        b = placement.replicate(np.int32(0))
        done = 0
        while done < n_steps:
            if k > 1 and n_steps - done >= k:
                dyn, acc, b = steps(dyn, acc, b)
                done += k
            else:
                dyn, acc, b = step(dyn, acc, b)
                done += 1
        jax.block_until_ready((dyn, acc))
        state["dyn"], state["acc"] = dyn, acc
        return n_steps * batch_size

    epoch()  # warm-up: compile
    name = "limit" if k == 1 else f"limit K={k}"
    if fresh:
        name += " (fresh batches)"
    return Contestant(name, timed(epoch))


def solstice_fit(
    hidden, x, y, batch_size, *, k=1, on_device=False, defaults=False, precision=None
) -> Contestant:
    """`Trainer.fit`, timed per epoch of one running `fit` (see `EpochGate`); `precision`:
    `Trainer(precision=)`."""
    dm = ArrayDataModule(train={"image": x, "label": y}, batch_size=batch_size, on_device=on_device)
    n_steps = len(x) // batch_size
    gate = EpochGate()
    kwargs = {"max_epochs": 10**6, "callbacks": [gate]}
    if not defaults:
        kwargs.update(
            enable_progress_bar=False,
            loggers=[],
            log_every_n_steps=n_steps - n_steps % k,  # one log per epoch, a multiple of k
            steps_per_execution=k,
        )
    if precision is not None:
        kwargs["precision"] = precision
    trainer = solstice.Trainer(**kwargs)
    name = "solstice fit"
    if on_device:
        name += " (on_device)"
    if k > 1:
        name += f" K={k}"
    if defaults:
        name += " (defaults)"
    if precision is not None:
        name += f" ({precision})"
    return gate.contestant(name, trainer, make_experiment(hidden), dm, n_steps * batch_size)


# ---------------------------------------------------------------- hand-written loop
def naive_loop(hidden, x, y, batch_size) -> Contestant:
    """The loop a researcher writes first: filter_jit, numpy batches, float(loss) per step."""
    model = make_model(hidden, jax.random.key(0))
    optimizer = optax.adam(LR)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, images, labels):
        def loss_fn(model):
            logits = jax.vmap(model)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    rng = np.random.default_rng(0)
    n_steps = len(x) // batch_size
    state = {"model": model, "opt_state": opt_state}

    def epoch() -> int:
        model, opt_state = state["model"], state["opt_state"]
        order = rng.permutation(len(x))
        losses = []
        for i in range(n_steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            model, opt_state, loss = step(model, opt_state, x[idx], y[idx])
            losses.append(float(loss))
        state["model"], state["opt_state"] = model, opt_state
        return n_steps * batch_size

    epoch()  # warm-up
    return Contestant("naive eqx loop", timed(epoch))


# ---------------------------------------------------------------- peers
def peer(
    name: str, script: str, hidden, batch_size, samples, env=None, extra=()
) -> Contestant | str:
    args = [
        "--hidden",
        *map(str, hidden),
        "--batch-size",
        str(batch_size),
        "--samples",
        str(samples),
        *extra,
    ]
    p = Peer(script, args, env=env)
    if p.error:
        return f"{name}: not run ({p.error})"
    c = Contestant(name, p.epoch)
    c.close = p.close  # type: ignore[attr-defined]
    return c


# ---------------------------------------------------------------- main
def parse(description: str, hidden: list[int], batch_size: int, rounds: int):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--hidden", type=int, nargs="+", default=hidden)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--no-peers", action="store_true", help="skip Keras and Lightning")
    parser.add_argument("--no-lightning", action="store_true", help="skip Lightning")
    parser.add_argument(
        "--lightning-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for Lightning (default: torch's own choice)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="also time `solstice fit` under this `Trainer(precision=)`, e.g. bf16-mixed",
    )
    return parser.parse_args()


def build(args, *, fused: int | None, include_defaults: bool) -> tuple[list[Contestant], list[str]]:
    x, y = mnist_like(args.samples)
    hidden, b = args.hidden, args.batch_size
    notes: list[str] = []
    print(f"warming up (compiling) on {machine()}", flush=True)
    cs = [limit(hidden, x, y, b), limit(hidden, x, y, b, fresh=True), solstice_fit(hidden, x, y, b)]
    cs.append(solstice_fit(hidden, x, y, b, on_device=True))
    if fused:
        cs.append(limit(hidden, x, y, b, k=fused, fresh=True))
        cs += [limit(hidden, x, y, b, k=fused), solstice_fit(hidden, x, y, b, k=fused)]
        cs.append(solstice_fit(hidden, x, y, b, k=fused, on_device=True))
    if include_defaults:
        cs.append(solstice_fit(hidden, x, y, b, defaults=True))
    if args.precision:
        cs.append(solstice_fit(hidden, x, y, b, precision=args.precision))
    cs.append(naive_loop(hidden, x, y, b))
    if not args.no_peers:
        peers = [("keras fit (jax)", "peer_keras.py", {"KERAS_BACKEND": "jax"}, [])]
        if not args.no_lightning:
            threads = (
                [] if args.lightning_threads is None else ["--threads", str(args.lightning_threads)]
            )
            peers.append(("lightning (cpu torch)", "peer_lightning.py", None, threads))
        for name, script, env, extra in peers:
            got = peer(name, script, hidden, b, args.samples, env, extra)
            if isinstance(got, str):
                notes.append(got)
                print(got, flush=True)
            else:
                cs.append(got)
    return cs, notes


def ratio_line(by: dict[str, Contestant], a: str, b: str, target: float | None = None) -> str:
    """`a / b` speed: median of per-round ratios (the headline), then the ratio of the best
    rounds and the median ratio of samples per CPU second, which load from other processes
    disturbs less."""
    if a not in by or b not in by:
        return f"{a} / {b}: not measured"
    value = ratio(by[a], by[b])
    lo, hi = spread(by[a], by[b])
    label = f"{a} / {b}"
    extra = (
        f"   (rounds {lo:.2f}-{hi:.2f}; best/best {best_ratio(by[a], by[b]):.3f}x; "
        f"per CPU-s {cpu_ratio(by[a], by[b]):.3f}x)"
    )
    if target is None:
        return f"{label:<58} {value:6.3f}x" + extra
    return check(label, value, target) + extra
