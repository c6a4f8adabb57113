"""Step compilation: the jitted train/eval/predict functions the Trainer calls.

The experiment is split once into its arrays (`dyn`, donated and updated every step) and the
rest (`static`, closed over by the compiled functions). Metrics are merged into an on-device
accumulator inside the compiled step, so the loop never reads a value back. Everything the
functions need about the metrics' structure (their non-array part, the names of the packed
scalars) is worked out before they are built (`prepare`), by tracing abstractly: nothing is
stored while a compiled function traces.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._experiment import Experiment
from .._in_step import InStep, StepData
from .._metrics import Metrics
from .._optimizer_tap import calls_of, optimizers_of, tap, untap
from ..loggers._packed import PackedMetrics, pack_scalars, packed_names
from ._microbatches import OptimizerSteps
from ._precision import POLICIES, Policy, apply_policy
from ._step_checks import (
    call_step,
    check_metric_leaves,
    check_metrics,
    check_train_output,
    scalar_metrics,
    warn_if_unchanged,
)
from ._trace_log import TraceLog


def _select(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def _shape_key(tree: PyTree) -> tuple:
    """A hashable key of a pytree's structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None)) for x in leaves)


def _named(fn: Callable, name: str) -> Callable:
    """Name the function so compile-time reports say `jit(train_step)`, not `jit(fn)`."""
    fn.__name__ = fn.__qualname__ = name
    return fn


def _is_shape(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


@dataclasses.dataclass(frozen=True)
class MetricLayout:
    """A stage's metrics, worked out before any compiled function is built: the arrays'
    shapes, the non-array part of the `Metrics`, and the names `compute()` returns (the
    packed float scalars first, in order)."""

    shapes: PyTree
    static: PyTree
    packed: tuple[str, ...]
    names: frozenset[str]


class CompiledSteps:
    """The compiled step functions for one experiment structure.

    **Arguments:**

    - `experiment`: a template whose non-array part is closed over.
    - `replicated`: the sharding the experiment's arrays live in.
    - `trace_log`: where traces are counted (for the recompilation warning).
    - `keep_step_metrics`: also return each step's own metrics (for per-batch hooks).
    - `dyn_shardings`: a pytree of shardings for the experiment's arrays (see
      `Trainer(sharding_rules=)`), or `None` to keep them `replicated`.
    - `in_steps`: the in-step reductions (`Callback.in_step`) the training steps carry, by
      name; their states travel with the experiment through every training call.
    - `policy`: the precision policy every step computes under (`Trainer(precision=)`).
    """

    def __init__(
        self,
        experiment: Experiment,
        replicated: jax.sharding.Sharding,
        trace_log: TraceLog,
        *,
        keep_step_metrics: bool = False,
        dyn_shardings: PyTree = None,
        in_steps: dict[str, InStep] | None = None,
        policy: Policy = POLICIES["32-true"],
    ):
        _, self.static = eqx.partition(experiment, eqx.is_array)
        template, self._full_def = jax.tree.flatten(experiment)
        self._array_slots = [i for i, leaf in enumerate(template) if eqx.is_array(leaf)]
        self._template = [None if eqx.is_array(leaf) else leaf for leaf in template]
        self.replicated = replicated
        self.dyn_shardings = dyn_shardings
        self.trace_log = trace_log
        self.keep_step_metrics = keep_step_metrics
        self.in_steps = dict(in_steps or {})
        self.policy = policy
        self.layouts: dict[str, MetricLayout] = {}
        self._layouts_by_shape: dict[Any, MetricLayout] = {}
        self._prefixed: dict[tuple[str, str], tuple[tuple[str, ...], PackedMetrics]] = {}
        self._jitted: dict[Any, Callable] = {}
        self.batch_transform: Callable[[PyTree, jax.Array], PyTree] | None = None

    def set_batch_transform(self, transform: Callable[[PyTree, jax.Array], PyTree] | None) -> None:
        """Apply `transform(batch, global_step)` to every training batch inside the compiled
        step (a DataModule's `device_transform`, e.g. on-device augmentation)."""
        if transform != self.batch_transform:
            self.batch_transform = transform
            for key in list(self._jitted):
                if key[0] in ("train", "train_many", "train_accumulated"):
                    del self._jitted[key]

    def user_function(self, method: str) -> Callable | None:
        """The experiment class's `method` (what a retrace warning points at)."""
        return getattr(type(self.static), method, None)

    # ---- experiment <-> arrays
    def combine(self, dyn: PyTree) -> Experiment:
        return eqx.combine(dyn, self.static)

    def experiment_from_leaves(self, leaves: list) -> Experiment:
        """The experiment from its array leaves (`FlatTree.leaves` of `dyn`), with one
        unflatten: ~3x cheaper than rebuilding `dyn` and combining it with `static`."""
        full = list(self._template)
        for slot, leaf in zip(self._array_slots, leaves, strict=True):
            full[slot] = leaf
        return jax.tree.unflatten(self._full_def, full)

    def _split_new(self, new: Experiment, dyn: PyTree) -> PyTree:
        new_dyn, new_static = eqx.partition(new, eqx.is_array)
        same = bool(jax.tree.structure(new_dyn) == jax.tree.structure(dyn))  # type: ignore[operator]
        if not same or not eqx.tree_equal(new_static, self.static):
            raise ValueError(
                f"`{type(new).__name__}.train_step` returned an experiment whose structure or "
                "non-array fields differ from the input's. A step may only change array "
                "values; keep Python numbers that change as `jnp` arrays and keep the same "
                "fields."
            )
        shardings = self.replicated if self.dyn_shardings is None else self.dyn_shardings
        return jax.lax.with_sharding_constraint(new_dyn, shardings)

    # ---- the metrics' structure, out of band
    def _step_metrics(self, stage: str, dyn: PyTree, batch: PyTree) -> Metrics:
        """Traced abstractly: the `Metrics` one step of `stage` returns."""
        exp = self.combine(dyn)
        if stage == "train":
            batch = self._transformed(batch, jnp.int32(0))
            return apply_policy(self.policy, exp, batch, self._call_train_step, None)[1]
        return self.policy.evaluate(exp, batch, self._call_eval_step, metrics=True)

    def prepare(self, stage: str, dyn: PyTree, batch: PyTree) -> MetricLayout:
        """Work out the metrics of a `stage` (`"train"` or `"eval"`) step on a batch like
        `batch` (tracing abstractly: ~15 ms for a small model, once per signature), and keep
        it for the compiled functions of that stage."""
        key = (stage, _shape_key(dyn), _shape_key(batch), self.batch_transform)
        layout = self._layouts_by_shape.get(key)
        if layout is None:
            metrics = eqx.filter_eval_shape(self._step_metrics, stage, dyn, batch)
            check_metric_leaves(metrics, "train_step" if stage == "train" else "eval_step")
            shapes, static = eqx.partition(metrics, _is_shape)
            values = jax.eval_shape(lambda m: eqx.combine(m, static).compute(), shapes)
            scalar_metrics(values, stage)
            layout = MetricLayout(shapes, static, packed_names(values), frozenset(values))
            self._layouts_by_shape[key] = layout
        self.layouts[stage] = layout
        return layout

    def empty_accumulator(self, stage: str, dyn: PyTree, batch: PyTree) -> PyTree:
        """Zeros shaped like one step's metrics arrays (overwritten by the first step)."""
        shapes = self.prepare(stage, dyn, batch).shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.device_put(zeros, self.replicated)

    def metric_names(self, stage: str, dyn: PyTree, batch: PyTree) -> frozenset[str]:
        """The names `compute()` gives the metrics of a `stage` step (nothing runs)."""
        return self.prepare(stage, dyn, batch).names

    def metrics(self, stage: str, m_dyn: PyTree) -> Metrics:
        """Rebuild a `Metrics` object from its arrays."""
        return eqx.combine(m_dyn, self.layouts[stage].static)

    # ---- traced bodies
    def _transformed(self, batch: PyTree, step: jax.Array) -> PyTree:
        return batch if self.batch_transform is None else self.batch_transform(batch, step)

    def _accumulate(self, stage: str, acc: PyTree, m_dyn: PyTree, reset: jax.Array) -> PyTree:
        merged = self.metrics(stage, acc).merge(self.metrics(stage, m_dyn))
        return _select(reset, m_dyn, eqx.partition(merged, eqx.is_array)[0])

    def _train_step(self, dyn, acc, batch, reset, carries, step, gather, decode):
        """Traced: one training step on `batch` (or on `gather(batch, step)`), decoded by
        `decode` if given; the in-step reductions see it. Returns `(dyn, acc, step metrics
        or None, carries, step + 1)`."""
        if gather is not None:
            batch = gather(batch, step)
        if decode is not None:
            batch = decode(batch)
        batch = self._transformed(batch, step)
        exp = self.combine(dyn)
        new, metrics, calls, carries = apply_policy(
            self.policy, exp, batch, self._call_train_step, carries
        )
        new_dyn = self._split_new(new, dyn)
        warn_if_unchanged(new, dyn)
        m_dyn = eqx.partition(metrics, eqx.is_array)[0]
        acc = self._accumulate("train", acc, m_dyn, reset)
        if carries is not None:
            data = StepData(metrics, batch, step + 1, new, exp, calls)
            carries = {k: self.in_steps[k].update(c, data) for k, c in carries.items()}
        return new_dyn, acc, (m_dyn if self.keep_step_metrics else None), carries, step + 1

    def _call_train_step(self, exp: Experiment, batch: PyTree) -> tuple[Experiment, Metrics, tuple]:
        """Traced: `train_step(batch)`, with the experiment's optimizers tapped when an
        in-step reduction reads their calls (`InStep.uses_optimizer_calls`)."""
        if not any(s.uses_optimizer_calls for s in self.in_steps.values()):
            return (*check_train_output(call_step(exp, "train_step", batch), exp), ())
        count = len(optimizers_of(exp))
        if count == 0:
            users = [k for k, s in self.in_steps.items() if s.uses_optimizer_calls]
            raise ValueError(
                f"{', '.join(users)} read the gradients and updates of the experiment's "
                f"optimizer, but `{type(exp).__name__}` holds no `solstice.Optimizer` (an "
                "optax state kept by hand is invisible to the Trainer). Wrap the optax "
                "transformation in `solstice.OptaxOptimizer` and call it in `train_step`."
            )
        new, metrics = check_train_output(call_step(tap(exp), "train_step", batch), exp)
        new, taps = untap(new, count)
        return new, metrics, calls_of(taps)

    @staticmethod
    def _call_eval_step(exp: Experiment, batch: PyTree) -> Metrics:
        return check_metrics(call_step(exp, "eval_step", batch), exp, "eval_step")

    def _close(self, stage: str, acc: PyTree, total: PyTree, reset: jax.Array):
        """Traced: the interval's metrics, packed (see `PackedMetrics`), and the interval
        folded into `total`."""
        interval = self.metrics(stage, acc)
        merged = self.metrics(stage, total).merge(interval)
        _, vector, rest = pack_scalars(scalar_metrics(interval.compute(), stage))
        return (vector, rest), _select(reset, acc, eqx.partition(merged, eqx.is_array)[0])

    def unpack(self, stage: str, packed: tuple[Any, Any], prefix: str = "") -> PackedMetrics:
        """The `PackedMetrics` of a closed interval (`packed` from `train`/`close_interval`);
        the prefixed names are built once per (stage, prefix), not per log."""
        vector, rest = packed
        names = self.layouts[stage].packed
        layout = self._prefixed.get((stage, prefix))
        if layout is None or layout[0] is not names:
            layout = (names, PackedMetrics(names, None, prefix=prefix))
            self._prefixed[(stage, prefix)] = layout
        if rest:
            rest = {prefix + k: v for k, v in rest.items()}
        return layout[1].with_values(vector, rest)

    # ---- the compiled functions
    def _get(self, key: tuple, build: Callable[[], Callable]) -> Callable:
        fn = self._jitted.get(key)
        if fn is None:
            fn = self._jitted[key] = build()
        return fn

    def train(self, defs: tuple, *, closing: bool = False, gather=None, decode=None) -> Callable:
        """The compiled single training step on flat leaves (see `FlatTree`):
        `fn(dyn, acc, batch, reset, carries, step, total, epoch_reset)`; `defs` are the
        treedefs of `dyn`, the accumulators and the in-step carries.

        `step` is the global step, an int32 device scalar (not donated): it keys the batch
        transform and comes back incremented, ready only when the whole step has run (the
        loop bounds how far dispatch runs ahead with it). With `closing` the step also closes
        the log interval (`total`, `epoch_reset`; otherwise `None`): one dispatch per log,
        not two. With `gather` (a hashable `gather(data, step) -> batch`) the batch is
        gathered inside the step; with `decode` (a loader's deferred transform) it is decoded
        there. Returns `(dyn, acc, step_metrics_or_None, carries, step + 1)`, plus
        `(packed, total)` when closing; donates `dyn`, `acc`, `carries` and `total`.
        """

        def build() -> Callable:
            def fn(dyn, acc, batch, reset, carries, step, total, epoch_reset):
                dyn, acc, carries = self._unflatten(defs, dyn, acc, carries)
                seen = batch if gather is None else jax.eval_shape(gather, batch, step)
                self._record("train_and_log" if closing else "train", seen, acc)
                dyn, acc, ms, carries, step = self._train_step(
                    dyn, acc, batch, reset, carries, step, gather, decode
                )
                out = (*self._flatten(dyn, acc, carries), ms, step)
                if closing:
                    packed, total = self._close("train", acc, defs[1].unflatten(total), epoch_reset)
                    out += (packed, jax.tree.leaves(total))
                return out

            name = "train_step_and_log" if closing else "train_step"
            return jax.jit(_named(fn, name), donate_argnums=(0, 1, 4, 6))

        return self._get(("train", closing, gather, decode, defs), build)

    def train_many(self, defs: tuple, *, gather=None, length=None, decode=None) -> Callable:
        """The compiled `K` fused training steps (`lax.scan`) on stacked batches `(K, batch,
        ...)` (or, with `gather`, on its data, `length` giving `K`):
        `fn(dyn, acc, batches, reset, carries, step) -> (dyn, acc, carries,
        stacked_step_metrics_or_None, step + K)`. The log interval is closed by a separate
        `close_interval` call."""

        def build() -> Callable:
            def fn(dyn, acc, batches, reset, carries, step):
                dyn, acc, carries = self._unflatten(defs, dyn, acc, carries)
                seen = batches if gather is None else jax.eval_shape(gather, batches, step)
                self._record("train_many", seen, acc, key="batches")

                def body(carry, batch):
                    dyn, acc, flag, carries, step = carry
                    source = batches if gather is not None else batch
                    dyn, acc, ms, carries, step = self._train_step(
                        dyn, acc, source, flag, carries, step, gather, decode
                    )
                    return (dyn, acc, jnp.zeros_like(flag), carries, step), ms

                carry = (dyn, acc, reset, carries, step)
                xs = None if gather is not None else batches
                (dyn, acc, _, carries, step), ms = jax.lax.scan(body, carry, xs, length=length)
                return (*self._flatten(dyn, acc, carries), ms, step)

            return jax.jit(_named(fn, "train_steps_fused"), donate_argnums=(0, 1, 4))

        return self._get(("train_many", gather, length, decode, defs), build)

    def train_accumulated(
        self,
        defs: tuple,
        *,
        n: int,
        m: int,
        accumulate: int,
        closing: bool,
        decode=None,
        gather=None,
    ) -> Callable:
        """The compiled `n` optimizer steps of `m` microbatches each (`accumulate_grad_batches`,
        see `_microbatches`) on stacked batches `(n * m, batch, ...)` (or, with `gather`, on
        its data), with the signature and outputs of `train` (closing the log interval inside
        when `closing`)."""
        partial = m != accumulate
        name = "train_accumulated" + ("_partial" if partial else "") + ("_many" if n > 1 else "")
        name += "_and_log" if closing else ""

        def build() -> Callable:
            optimizer_steps = OptimizerSteps(self, accumulate, decode, gather)

            def fn(dyn, acc, batches, reset, carries, step, total, epoch_reset):
                dyn, acc, carries = self._unflatten(defs, dyn, acc, carries)
                seen = batches if gather is None else jax.eval_shape(gather, batches, step)
                self._record(name, seen, acc, key="batches")
                dyn, acc, ms, carries, step = optimizer_steps.many(
                    dyn, acc, batches, reset, carries, step, n, m
                )
                out = (*self._flatten(dyn, acc, carries), ms, step)
                if closing:
                    packed, total = self._close("train", acc, defs[1].unflatten(total), epoch_reset)
                    out += (packed, jax.tree.leaves(total))
                return out

            fn_name = "train_step_partial" if partial else "train_step"
            fn_name += ("s_fused" if n > 1 else "") + ("_and_log" if closing else "")
            return jax.jit(_named(fn, fn_name), donate_argnums=(0, 1, 4, 6))

        key = ("train_accumulated", n, m, accumulate, closing, decode, gather, defs)
        return self._get(key, build)

    @staticmethod
    def _unflatten(defs: tuple, dyn: list, acc: list, carries: list | None) -> tuple:
        dyn_def, acc_def, carries_def = defs
        unflat_carries = None if carries is None else carries_def.unflatten(carries)
        return dyn_def.unflatten(dyn), acc_def.unflatten(acc), unflat_carries

    @staticmethod
    def _flatten(dyn: PyTree, acc: PyTree, carries: PyTree) -> tuple:
        flat_carries = None if carries is None else jax.tree.leaves(carries)
        return jax.tree.leaves(dyn), jax.tree.leaves(acc), flat_carries

    def _record(self, name: str, batch: PyTree, acc: PyTree, key: str = "batch") -> None:
        method = "train_step" if name.startswith("train") else "eval_step"
        self.trace_log.record(name, {key: batch, "metrics": acc}, self.user_function(method))

    def evaluate(self, defs: tuple, decode=None, *, stage: str = "eval", short: bool = False):
        """The compiled evaluation step on flat leaves: `fn(dyn, acc, batch, reset) -> (acc,
        step_metrics_or_None, ticket)`, donating `acc` only (`ticket`: a tiny output ready
        when the step has run, for the in-flight bound; `decode`: as in `train`).

        `short`: the function for the short last batch of `stage`'s runs, which has its own
        size (see `_eval_input`): compiled on its own, once per stage and size, so its
        compilation is not a retrace of the full-batch step."""
        name = (f"{stage}_last_batch" if short else "eval") + ("" if decode is None else "_decoded")
        dyn_def, acc_def = defs

        def build() -> Callable:
            def step(dyn, acc, batch, reset):
                dyn, acc = dyn_def.unflatten(dyn), acc_def.unflatten(acc)
                self._record(name, batch, acc)
                if decode is not None:
                    batch = decode(batch)
                exp = self.combine(dyn)
                metrics = self.policy.evaluate(exp, batch, self._call_eval_step, metrics=True)
                m_dyn = eqx.partition(metrics, eqx.is_array)[0]
                acc = self._accumulate("eval", acc, m_dyn, reset)
                ms = m_dyn if self.keep_step_metrics else None
                return jax.tree.leaves(acc), ms, jnp.logical_not(reset)

            fn_name = f"eval_step_{stage}_last_batch" if short else "eval_step"
            return jax.jit(_named(step, fn_name), donate_argnums=(1,))

        return self._get(("eval", name, decode, defs), build)

    def predict(self, dyn: PyTree, batch: PyTree, decode=None, *, short: bool = False):
        """One predict step: `predict_step(batch)`'s outputs (`decode`, `short`: as in
        `evaluate`)."""
        name = ("predict_last_batch" if short else "predict") + (
            "" if decode is None else "_decoded"
        )

        def build() -> Callable:
            def step(dyn, batch):
                self.trace_log.record(name, {"batch": batch}, self.user_function("predict_step"))
                if decode is not None:
                    batch = decode(batch)
                predict = lambda e, b: call_step(e, "predict_step", b)  # noqa: E731
                return self.policy.evaluate(self.combine(dyn), batch, predict, metrics=False)

            return jax.jit(_named(step, "predict_step_last_batch" if short else "predict_step"))

        return self._get(("predict", name, decode), build)(dyn, batch)

    def close_interval(self, stage: str, acc: PyTree, total: PyTree, reset: jax.Array):
        """Compute the interval's metrics and fold the interval into the running total:
        `(packed, new_total)`; `unpack(stage, packed)` makes the metrics mapping."""

        def build() -> Callable:
            def fn(acc, total, reset):
                return self._close(stage, acc, total, reset)

            return jax.jit(_named(fn, f"close_{stage}_interval"), donate_argnums=(1,))

        return self._get(("close", stage), build)(acc, total, reset)

    def compute(self, stage: str, acc: PyTree) -> dict[str, jax.Array]:
        """`compute()` of an accumulator, on the device."""

        def build() -> Callable:
            return jax.jit(lambda a: scalar_metrics(self.metrics(stage, a).compute(), stage))

        return self._get(("compute", stage), build)(acc)
