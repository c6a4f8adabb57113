"""Step compilation: the jitted train/eval/predict functions the Trainer calls.

The experiment is split once into its arrays (`dyn`, donated and updated every step) and the
rest (`static`, closed over by the compiled functions). Metrics are merged into an on-device
accumulator inside the compiled step, so the loop never reads a value back.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._experiment import Experiment
from .._metrics import Metrics
from ..loggers._packed import PackedMetrics, pack_scalars
from ._user_code import warn_at

PyTree = Any


def _select(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


def _advance_guard(
    first_bad: PyTree, m_dyn: PyTree, step: jax.Array, batch: PyTree = None
) -> PyTree:
    """Remember the first step whose metrics (and `batch`, if given: `detect_anomaly`) hold a
    non-finite value.

    `first_bad` is an int32 scalar: the (1-based) global step whose metrics first were not
    finite, or -1; `step` is the (1-based) number of the step just taken. `None` (no
    `TerminateOnNaN`, no `detect_anomaly`) passes through and costs nothing.
    """
    if first_bad is None:
        return None
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves((m_dyn, batch))
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not checks:
        return first_bad
    finite = jnp.all(jnp.stack(checks))
    return jnp.where((first_bad < 0) & ~finite, step, first_bad)


def _shape_key(tree: PyTree) -> tuple:
    """A hashable key of a pytree's structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None)) for x in leaves)


def _signature(args: dict[str, PyTree]) -> dict[str, str]:
    """Shapes, dtypes and static values of named pytrees of arguments, by name and path
    (e.g. `batch['image']`)."""
    out = {}
    for name, tree in args.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = name + jax.tree_util.keystr(path)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                out[key] = f"{leaf.dtype}{list(leaf.shape)}"
            else:
                out[key] = repr(leaf)
    return out


def _describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"`{key}`: {old.get(key, 'absent')} -> {new.get(key, 'absent')}")
    return "; ".join(changes[:5]) or "the structure of its arguments"


def static_differences(old: Any, new: Any, path: str) -> list[str]:
    """`"<path>: old -> new"` for every non-array value that differs between two static
    parts of experiments (arrays are `None` in both), fields of modules by name."""
    if old is new:
        return []
    if type(old) is not type(new):
        return [f"`{path}`: {type(old).__name__} -> {type(new).__name__}"]
    if isinstance(old, eqx.Module):
        return [
            change
            for field in dataclasses.fields(old)
            for change in static_differences(
                getattr(old, field.name, None),
                getattr(new, field.name, None),
                f"{path}.{field.name}",
            )
        ]
    if isinstance(old, list | tuple) and len(old) == len(new):
        return [
            c
            for i, (a, b) in enumerate(zip(old, new))
            for c in static_differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(old, dict) and old.keys() == new.keys():
        return [c for k in old for c in static_differences(old[k], new[k], f"{path}[{k!r}]")]
    try:
        same = bool(old == new)
    except Exception:  # noqa: BLE001 - e.g. arrays compared elementwise: not equal here
        same = False
    return [] if same else [f"`{path}`: {old!r} -> {new!r}"]


class TraceLog:
    """Counts traces of each compiled function and warns once when one is retraced.

    A new experiment structure (`new_generation`, e.g. a hook changed a non-array field)
    compiles new functions: their first traces are not retraces.
    """

    def __init__(self) -> None:
        self.signatures: dict[str, list[dict[str, str]]] = {}
        self.warned: set[str] = set()
        self._generation = 0
        self._traced_in: dict[str, int] = {}  # name -> generation of its last trace

    def new_generation(self) -> None:
        self._generation += 1

    def record(self, name: str, args: dict[str, PyTree], source: Any = None) -> None:
        """Count a trace of `name` with named arguments `args`; `source` is the user's
        function it runs (the warning points there)."""
        sig = _signature(args)
        history = self.signatures.setdefault(name, [])
        history.append(sig)
        again = self._traced_in.get(name) == self._generation
        self._traced_in[name] = self._generation
        if again and name not in self.warned:
            self.warned.add(name)
            warn_at(
                source,
                f"The {name} step was traced again (trace #{len(history)}), which means a "
                f"recompilation: {_describe_change(history[-2], sig)}. Keep shapes, dtypes "
                "and non-array experiment fields constant between steps (store changing "
                "numbers as `jnp` arrays; only the last evaluation batch may be shorter).",
                RuntimeWarning,
            )

    def count(self, name: str) -> int:
        return len(self.signatures.get(name, []))


def _check_train_output(out: Any, experiment: Experiment) -> tuple[Experiment, Metrics]:
    name = type(experiment).__name__
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"`{name}.train_step` must return a tuple `(experiment, metrics)`, got "
            f"`{type(out).__name__}`. End it with `return new_experiment, metrics`."
        )
    new, metrics = out
    if not isinstance(new, Experiment):
        raise TypeError(
            f"`{name}.train_step` must return `(Experiment, Metrics)`, but its first element "
            f"is a `{type(new).__name__}`. Return the updated experiment first, e.g. "
            "`eqx.tree_at(lambda e: e.model, self, new_model), metrics`."
        )
    if not isinstance(metrics, Metrics):
        raise TypeError(
            f"`{name}.train_step` must return `(Experiment, Metrics)`, but its second element "
            f"is a `{type(metrics).__name__}`. Wrap the values in a `solstice.Metrics` "
            "subclass (e.g. `solstice.ClassificationMetrics`)."
        )
    return new, metrics


def _check_metrics(out: Any, experiment: Experiment, method: str) -> Metrics:
    if not isinstance(out, Metrics):
        raise TypeError(
            f"`{type(experiment).__name__}.{method}` must return a `solstice.Metrics`, got "
            f"`{type(out).__name__}`."
        )
    return out


def _call_step(experiment: Experiment, method: str, batch: PyTree) -> Any:
    """`experiment.<method>(batch)` while tracing; an error it raises (a shape the model
    rejects, say) gets a note listing the batch's leaves, by path, with their shapes."""
    try:
        return getattr(experiment, method)(batch)
    except Exception as error:
        add_note = getattr(error, "add_note", None)  # Python 3.11+
        if add_note is not None:
            leaves = ", ".join(
                f"`batch{jax.tree_util.keystr(path)}`: {getattr(x, 'dtype', type(x).__name__)}"
                f"{list(getattr(x, 'shape', ()))}"
                for path, x in jax.tree_util.tree_leaves_with_path(batch)
            )
            add_note(
                f"(Solstice) raised while tracing `{type(experiment).__name__}.{method}` on a "
                f"batch with leaves {leaves}. If a size does not match what the model "
                "expects, that batch leaf (or the model's size) is the one to fix."
            )
        raise


def _scalar_metrics(values: dict[str, Any], stage: str) -> dict[str, Any]:
    """`compute()`'s values, checked (while tracing) to be scalars: loggers take numbers."""
    for name, value in values.items():
        shape = getattr(value, "shape", ())
        if shape != ():
            raise ValueError(
                f"The {stage} metric `{name}` has shape {tuple(shape)}, but every value "
                "`Metrics.compute()` returns must be a scalar (loggers record numbers). Reduce "
                f"it (e.g. `jnp.mean`), or return each element under its own name "
                f"(`{{f'{name}_{{i}}': v for i, v in enumerate(values)}}`)."
            )
    return values


def _check_metric_leaves(metrics: Metrics, method: str) -> None:
    """Every leaf of a step's `Metrics` must be an array: anything else is not traced, so it
    would keep its first value for the whole run (a silent wrong number)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(metrics):
        if not eqx.is_array(leaf):
            field = f"{type(metrics).__name__}{jax.tree_util.keystr(path)}"
            raise TypeError(
                f"`{field}` is a `{type(leaf).__name__}` ({leaf!r}) in the metrics that "
                f"`{method}` returned, not an array. A `Metrics` field that is not an array is "
                "not traced: it would keep its first value for the whole run. Store it as an "
                f"array, e.g. `self.count = jnp.asarray(labels.shape[0], jnp.float32)`, or "
                "mark configuration `eqx.field(static=True)`."
            )


def _warn_if_unchanged(new: Experiment, dyn: PyTree) -> None:
    """Warn (at trace time, so once per compilation) when `train_step` returns its input."""
    leaves, new_leaves = jax.tree.leaves(dyn), jax.tree.leaves(eqx.filter(new, eqx.is_array))
    if leaves and all(a is b for a, b in zip(leaves, new_leaves)):
        warn_at(
            getattr(type(new), "train_step", None),
            f"`{type(new).__name__}.train_step` returned an experiment whose arrays are all "
            "its input's, so training changes nothing. Return the updated experiment, e.g. "
            "`return eqx.tree_at(lambda e: (e.model, e.optimizer), self, (model, optimizer)), "
            "metrics`.",
            UserWarning,
        )


class CompiledSteps:
    """The compiled step functions for one experiment structure.

    **Arguments:**

    - `experiment`: a template whose non-array part is closed over.
    - `replicated`: the sharding the experiment's arrays live in.
    - `trace_log`: where traces are counted (for the recompilation warning).
    - `keep_step_metrics`: also return each step's own metrics (only when a per-batch hook
      needs them).
    - `dyn_shardings`: a pytree of shardings for the experiment's arrays (see
      `Trainer(sharding_rules=)`), or `None` to keep them `replicated`.
    - `detect_anomaly`: the guard (below) also covers every floating leaf of each training
      batch, and is tracked whether or not a `TerminateOnNaN` asks for it.
    - `track_nonfinite`: the training steps also carry a guard `(steps, first_bad)` that
      records, on the device, the first step whose metrics were not finite (only when a
      `TerminateOnNaN` callback asks for it). Otherwise the guard argument is `None`.
    """

    def __init__(
        self,
        experiment: Experiment,
        replicated: jax.sharding.Sharding,
        trace_log: TraceLog | None = None,
        keep_step_metrics: bool = False,
        track_nonfinite: bool = False,
        dyn_shardings: PyTree = None,
        detect_anomaly: bool = False,
    ):
        _, self.static = eqx.partition(experiment, eqx.is_array)
        template, self._full_def = jax.tree.flatten(experiment)
        self._array_slots = [i for i, leaf in enumerate(template) if eqx.is_array(leaf)]
        self._template = [None if eqx.is_array(leaf) else leaf for leaf in template]
        self.replicated = replicated
        self.dyn_shardings = dyn_shardings
        self.trace_log = trace_log or TraceLog()
        self.keep_step_metrics = keep_step_metrics
        self.track_nonfinite = track_nonfinite or detect_anomaly
        self.detect_anomaly = detect_anomaly
        self.metrics_static: dict[str, PyTree] = {}
        self.packed_names: dict[str, tuple[str, ...]] = {}
        self._accumulator_shapes: dict[Any, PyTree] = {}
        self._layouts: dict[tuple[str, str], tuple[tuple[str, ...], PackedMetrics]] = {}
        self._jitted: dict[str, Callable] = {}
        self.batch_transform: Callable[[PyTree, jax.Array], PyTree] | None = None

    def set_batch_transform(self, transform: Callable[[PyTree, jax.Array], PyTree] | None) -> None:
        """Apply `transform(batch, global_step)` to every training batch inside the compiled
        step (a DataModule's `device_transform`, e.g. on-device augmentation)."""
        if transform != self.batch_transform:
            self.batch_transform = transform
            for key in list(self._jitted):
                if isinstance(key, tuple) and key[0] in ("train", "train_many"):
                    del self._jitted[key]

    def _user_function(self, method: str) -> Callable | None:
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
        if jax.tree.structure(new_dyn) != jax.tree.structure(dyn) or not eqx.tree_equal(
            new_static, self.static
        ):
            raise ValueError(
                f"`{type(new).__name__}.train_step` returned an experiment whose structure or "
                "non-array fields differ from the input's. A step may only change array "
                "values; keep Python numbers that change as `jnp` arrays and keep the same "
                "fields."
            )
        shardings = self.replicated if self.dyn_shardings is None else self.dyn_shardings
        return jax.lax.with_sharding_constraint(new_dyn, shardings)

    def _metrics_parts(self, stage: str, metrics: Metrics) -> PyTree:
        _check_metric_leaves(metrics, "train_step" if stage == "train" else "eval_step")
        m_dyn, m_static = eqx.partition(metrics, eqx.is_array)
        self.metrics_static[stage] = m_static
        return m_dyn

    def metrics(self, stage: str, m_dyn: PyTree) -> Metrics:
        """Rebuild a `Metrics` object from its arrays."""
        return eqx.combine(m_dyn, self.metrics_static[stage])

    # ---- single steps (traced bodies)
    def _train_core(self, dyn, batch):
        exp = self.combine(dyn)
        new, metrics = _check_train_output(_call_step(exp, "train_step", batch), exp)
        new_dyn = self._split_new(new, dyn)
        _warn_if_unchanged(new, dyn)
        return new_dyn, self._metrics_parts("train", metrics)

    def _eval_core(self, dyn, batch):
        exp = self.combine(dyn)
        metrics = _check_metrics(_call_step(exp, "eval_step", batch), exp, "eval_step")
        return self._metrics_parts("eval", metrics)

    def _accumulate(self, stage, acc, m_dyn, reset):
        merged = self.metrics(stage, acc).merge(self.metrics(stage, m_dyn))
        return _select(reset, m_dyn, eqx.partition(merged, eqx.is_array)[0])

    def _train_body(self, dyn, acc, batch, reset):
        new_dyn, m_dyn = self._train_core(dyn, batch)
        return new_dyn, self._accumulate("train", acc, m_dyn, reset), m_dyn

    def _eval_body(self, dyn, acc, batch, reset):
        m_dyn = self._eval_core(dyn, batch)
        return self._accumulate("eval", acc, m_dyn, reset), m_dyn

    # ---- public compiled functions
    def _get(self, name: Any, build: Callable[[], Callable]) -> Callable:
        fn = self._jitted.get(name)
        if fn is None:
            fn = self._jitted[name] = build()
        return fn

    @staticmethod
    def _named(fn: Callable, name: str) -> Callable:
        """Name the function so compile-time reports say `jit(train_step)`, not `jit(fn)`."""
        fn.__name__ = fn.__qualname__ = name
        return fn

    def _transformed(self, batch, step):
        return batch if self.batch_transform is None else self.batch_transform(batch, step)

    def _close(self, stage, acc, total, reset):
        """Traced: the interval's computed metrics, packed (see `PackedMetrics`), and the
        interval folded into `total`."""
        interval = self.metrics(stage, acc)
        merged = self.metrics(stage, total).merge(interval)
        names, vector, rest = pack_scalars(_scalar_metrics(interval.compute(), stage))
        self.packed_names[stage] = names
        return (vector, rest), _select(reset, acc, eqx.partition(merged, eqx.is_array)[0])

    def unpack(self, stage: str, packed: tuple[Any, Any], prefix: str = "") -> PackedMetrics:
        """The `PackedMetrics` of a closed interval (`packed` from `train`/`close_interval`).

        The prefixed names are built once per (stage, prefix), not per log."""
        vector, rest = packed
        names = self.packed_names[stage]
        layout = self._layouts.get((stage, prefix))
        if layout is None or layout[0] is not names:
            layout = (names, PackedMetrics(names, None, prefix=prefix))
            self._layouts[(stage, prefix)] = layout
        if rest:
            rest = {prefix + k: v for k, v in rest.items()}
        return layout[1].with_values(vector, rest)

    def _step(self, dyn, acc, batch, reset, guard, step, gather, decode=None):
        """Traced: one training step on `batch` (or on `gather(batch, step)`), decoded by
        `decode(batch)` if given."""
        if gather is not None:
            batch = gather(batch, step)
        if decode is not None:
            batch = decode(batch)
        batch = self._transformed(batch, step)
        dyn, acc, m_dyn = self._train_body(dyn, acc, batch, reset)
        guard = _advance_guard(guard, m_dyn, step + 1, batch if self.detect_anomaly else None)
        return dyn, acc, (m_dyn if self.keep_step_metrics else None), guard, step + 1

    def train(
        self, dyn_def, acc_def, *, closing: bool = False, gather=None, decode=None
    ) -> Callable:
        """The compiled single training step, on flat leaves (see `FlatTree`):

        `fn(dyn, acc, batch, reset, guard, step, total, epoch_reset)`, where `dyn`, `acc` and
        `total` are the leaf lists of trees with structures `dyn_def` and `acc_def`.

        `step` is the global step as an int32 device scalar (not donated): it keys the
        batch transform and comes back incremented; it becomes ready only when the whole
        step has run, so the loop also uses it to bound how far dispatch runs ahead.

        With `closing`, the step also closes the log interval in the same call (see
        `close_interval`; `total` and `epoch_reset` are used, otherwise pass `None`), saving
        a dispatch per log. With `gather` (a hashable `gather(data, step) -> batch`, e.g. a
        device-resident DataModule's), `batch` is that data and the batch is gathered inside
        the step: one dispatch, no upload per step. With `decode` (a loader's deferred
        transform, see `BatchLoader.split_transform`), the batch is decoded inside the step.

        The function returns `(dyn, acc, step_metrics_or_None, guard, step + 1)`, plus
        `(packed, total)` when closing; it donates `dyn`, `acc`, `guard` (see
        `track_nonfinite`; `None` passes through) and `total`.
        """

        def build():
            def fn(dyn, acc, batch, reset, guard, step, total, epoch_reset):
                dyn = jax.tree.unflatten(dyn_def, dyn)
                acc = jax.tree.unflatten(acc_def, acc)
                seen = batch if gather is None else jax.eval_shape(gather, batch, step)
                self.trace_log.record(
                    "train_and_log" if closing else "train",
                    {"batch": seen, "metrics": acc},
                    self._user_function("train_step"),
                )
                dyn, acc, ms, guard, step = self._step(
                    dyn, acc, batch, reset, guard, step, gather, decode
                )
                out = (jax.tree.leaves(dyn), jax.tree.leaves(acc), ms, guard, step)
                if closing:
                    total = jax.tree.unflatten(acc_def, total)
                    packed, total = self._close("train", acc, total, epoch_reset)
                    out += (packed, jax.tree.leaves(total))
                return out

            name = "train_step_and_log" if closing else "train_step"
            return jax.jit(self._named(fn, name), donate_argnums=(0, 1, 4, 6))

        return self._get(("train", closing, gather, decode, dyn_def, acc_def), build)

    def train_many(self, dyn_def, acc_def, *, gather=None, length=None, decode=None) -> Callable:
        """The compiled `K` fused training steps, on flat leaves (see `train`):
        `fn(dyn, acc, batches, reset, guard, step)` over stacked batches `(K, batch, ...)`
        with `lax.scan`.

        With `gather` (see `train`), `batches` is the gather's data and `length` gives `K`.
        The log interval is closed by a separate `close_interval` call (once per K steps).

        The function returns `(dyn, acc, stacked_step_metrics_or_None, guard, step + K)`.
        """

        def build():
            def fn(dyn, acc, batches, reset, guard, step):
                dyn = jax.tree.unflatten(dyn_def, dyn)
                acc = jax.tree.unflatten(acc_def, acc)
                seen = batches if gather is None else jax.eval_shape(gather, batches, step)
                self.trace_log.record(
                    "train_many",
                    {"batches": seen, "metrics": acc},
                    self._user_function("train_step"),
                )

                def body(carry, batch):
                    dyn, acc, flag, guard, step = carry
                    source = batches if gather is not None else batch
                    dyn, acc, ms, guard, step = self._step(
                        dyn, acc, source, flag, guard, step, gather, decode
                    )
                    return (dyn, acc, jnp.zeros_like(flag), guard, step), ms

                carry = (dyn, acc, reset, guard, step)
                xs = None if gather is not None else batches
                (dyn, acc, _, guard, step), ms = jax.lax.scan(body, carry, xs, length=length)
                return jax.tree.leaves(dyn), jax.tree.leaves(acc), ms, guard, step

            return jax.jit(self._named(fn, "train_steps_fused"), donate_argnums=(0, 1, 4))

        return self._get(("train_many", gather, length, decode, dyn_def, acc_def), build)

    def evaluate(
        self, dyn_def, acc_def, decode=None, *, stage: str = "eval", short: bool = False
    ) -> Callable:
        """The compiled evaluation step on flat leaves (see `train`):
        `fn(dyn, acc, batch, reset) -> (acc, step_metrics_or_None, ticket)`; donates `acc`
        only. `ticket` is a tiny output that is ready when the step has run (for the in-flight
        bound). `decode`: as in `train`.

        `short`: the function for the short last batch of `stage`'s runs, which has its own
        size (see `_eval_input`): a function of its own, traced once per stage and size, so
        its compilation is not a retrace of the full-batch step."""
        name = f"{stage}_last_batch" if short else "eval"
        if decode is not None:
            # A stage whose per-batch hooks keep the decode on the host has its own
            # function (and name), not a retrace of this one.
            name += "_decoded"

        def build():
            def step(dyn, acc, batch, reset):
                dyn = jax.tree.unflatten(dyn_def, dyn)
                acc = jax.tree.unflatten(acc_def, acc)
                self.trace_log.record(
                    name, {"batch": batch, "metrics": acc}, self._user_function("eval_step")
                )
                if decode is not None:
                    batch = decode(batch)
                acc, m_dyn = self._eval_body(dyn, acc, batch, reset)
                ms = m_dyn if self.keep_step_metrics else None
                return jax.tree.leaves(acc), ms, jnp.logical_not(reset)

            fn_name = f"eval_step_{stage}_last_batch" if short else "eval_step"
            return jax.jit(self._named(step, fn_name), donate_argnums=(1,))

        return self._get(("eval", name, decode, dyn_def, acc_def), build)

    def predict(self, dyn, batch, decode=None, *, short: bool = False):
        """One predict step: the experiment's `predict_step(batch)` outputs (`decode`: as in
        `train`; `short`: the short last batch, see `evaluate`)."""
        name = "predict_last_batch" if short else "predict"
        if decode is not None:
            name += "_decoded"

        def build():
            def step(dyn, batch):
                self.trace_log.record(name, {"batch": batch}, self._user_function("predict_step"))
                if decode is not None:
                    batch = decode(batch)
                return _call_step(self.combine(dyn), "predict_step", batch)

            fn_name = "predict_step_last_batch" if short else "predict_step"
            return jax.jit(self._named(step, fn_name))

        return self._get(("predict", name, decode), build)(dyn, batch)

    def _metric_shapes(self, stage: str, dyn: PyTree, batch: PyTree) -> PyTree:
        """The shapes of one step's metrics arrays, from tracing the step abstractly (~15 ms
        for a small model), once per stage and argument signature."""
        key = (stage, _shape_key(dyn), _shape_key(batch), self.batch_transform)
        shapes = self._accumulator_shapes.get(key)
        if shapes is None:
            if stage == "train":
                shapes = jax.eval_shape(
                    lambda d, b: self._train_core(d, self._transformed(b, jnp.int32(0)))[1],
                    dyn,
                    batch,
                )
            else:
                shapes = jax.eval_shape(self._eval_core, dyn, batch)
            self._accumulator_shapes[key] = shapes
        return shapes

    def empty_accumulator(self, stage: str, dyn: PyTree, batch: PyTree) -> PyTree:
        """Zeros shaped like one step's metrics arrays (overwritten by the first step); the
        shapes are traced once per stage and signature, not at every fit or validation run."""
        shapes = self._metric_shapes(stage, dyn, batch)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.device_put(zeros, self.replicated)

    def metric_names(self, stage: str, dyn: PyTree, batch: PyTree | None) -> set[str]:
        """The names `compute()` gives the metrics of a `stage` (`"train"` or `"eval"`) step
        on a batch like `batch` (traced abstractly; nothing runs). Empty for no batch."""
        if batch is None:
            return set()
        shapes = self._metric_shapes(stage, dyn, batch)
        return set(jax.eval_shape(lambda m: self.metrics(stage, m).compute(), shapes))

    def close_interval(self, stage: str, acc, total, reset):
        """Compute the interval's metrics and fold the interval into the running total.

        Returns `(packed, new_total)`; `unpack(stage, packed)` makes the metrics mapping.
        """

        def build():
            def fn(acc, total, reset):
                return self._close(stage, acc, total, reset)

            return jax.jit(self._named(fn, f"close_{stage}_interval"), donate_argnums=(1,))

        return self._get(f"close_{stage}", build)(acc, total, reset)

    def compute(self, stage: str, acc) -> dict[str, jax.Array]:
        """`compute()` of an accumulator, on the device."""
        return self._get(
            f"compute_{stage}",
            lambda: jax.jit(lambda a: _scalar_metrics(self.metrics(stage, a).compute(), stage)),
        )(acc)
