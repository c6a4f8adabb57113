"""Microbatching (`Trainer(accumulate_grad_batches=K)`): one optimizer step over K batches.

The K microbatches of an optimizer step are scanned (`lax.scan`) inside one compiled call,
so only one microbatch's activations exist at a time. Every `solstice.Optimizer` of the
experiment is tapped (see `solstice._optimizer_tap`) with `accumulation_rule`: for the first
K-1 microbatches its call adds the gradients to the tap's carry (an f32 sum shaped like the
gradients) and returns zero updates and the optimizer unchanged; the K-th call hands the
wrapped optimizer `(sum + grads) / K` and returns its updates. Everything else `train_step`
changes (PRNG keys, batch-norm state) threads from microbatch to microbatch, and every
microbatch's metrics merge into the log accumulator as usual.

An epoch whose remaining batches are fewer than K ends with a *partial* optimizer step over
the r < K batches left, which averages those r (`accumulation_rule(r)`, compiled on its
own): no batch is dropped, and a step's gradient is always the mean over the samples it saw.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._experiment import Experiment
from .._in_step import StepData
from .._optimizer import Optimizer
from .._optimizer_tap import OptimizerCall, TapRule, calls_of, optimizers_of, tap, untap
from ._precision import apply_policy
from ._step_checks import call_step, check_train_output

#: The alternative to the Trainer's microbatching, for experiments it cannot tap.
MULTISTEPS_RECIPE = (
    "`optax.MultiSteps(transformation, every_k_schedule=K)` (see the 'Gradient "
    "accumulation' section of docs/tutorials/library-compatibility.md)"
)


def require_optimizers(experiment: Experiment, accumulate: int) -> int:
    """The number of `solstice.Optimizer`s of `experiment`; `ValueError` if it has none (its
    gradients cannot be summed over microbatches)."""
    count = len(optimizers_of(experiment))
    if count == 0:
        name = type(experiment).__name__
        raise ValueError(
            f"`Trainer(accumulate_grad_batches={accumulate})` sums the gradients that "
            f"`train_step` hands its `solstice.Optimizer`, but `{name}` holds none (an optax "
            "state kept by hand is invisible to the Trainer). Wrap the optax transformation "
            "in `solstice.OptaxOptimizer` and call it in `train_step`, or keep "
            f"`accumulate_grad_batches=1` and accumulate in optax: {MULTISTEPS_RECIPE}."
        )
    return count


def _sum_dtype(dtype: Any) -> Any:
    """The dtype gradients are summed in: at least float32 (bf16 sums lose microbatches)."""
    return jnp.promote_types(dtype, jnp.float32)


def _sum(total: PyTree, grads: PyTree) -> PyTree:
    return jax.tree.map(lambda s, g: s + g.astype(s.dtype), total, grads)


def _zeros(shapes: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sum_zeros(grad_shapes: PyTree) -> PyTree:
    """The sum of no gradients: zeros shaped like them, in their summing dtype."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, _sum_dtype(s.dtype)), grad_shapes)


def accumulation_rule(microbatches: int) -> TapRule:
    """The `TapRule` of an optimizer step over `microbatches` microbatches. The tap's carry
    is `(index, sum)`: the microbatch's index in the step (int32) and the sum (float32 at
    least) of the gradients of the microbatches before it."""

    def rule(inner: Optimizer, grads, params, extra_args, carry):
        index, total = carry
        total = _sum(total, grads)
        inner_dyn, inner_static = eqx.partition(inner, eqx.is_array)

        def apply():
            mean = jax.tree.map(lambda s, g: (s / microbatches).astype(g.dtype), total, grads)
            updates, new_inner = inner(mean, params, **extra_args)
            return updates, eqx.filter(new_inner, eqx.is_array), mean

        if microbatches == 1:
            updates, new_dyn, seen = apply()
        else:
            shapes = jax.eval_shape(apply)[0]

            def hold():
                return _zeros(shapes), inner_dyn, grads

            last = index == microbatches - 1
            updates, new_dyn, seen = jax.lax.cond(last, apply, hold)
        return updates, eqx.combine(new_dyn, inner_static), (index + 1, total), seen

    return rule


def call_shapes(experiment: Experiment, batch: PyTree, count: int) -> tuple[OptimizerCall, ...]:
    """Traced abstractly: the shapes of what `train_step` hands each optimizer on `batch`
    (the gradients' structure sizes the sums)."""

    def calls(exp: Experiment, batch: PyTree) -> tuple[OptimizerCall, ...]:
        new, _ = check_train_output(call_step(tap(exp), "train_step", batch), exp)
        return calls_of(untap(new, count)[1])

    return eqx.filter_eval_shape(calls, experiment, batch)


class OptimizerSteps:
    """The traced optimizer steps of a microbatched run, built on `steps` (the run's
    `CompiledSteps`: its experiment template, accumulators, batch transform and in-step
    reductions). `accumulate` is `Trainer(accumulate_grad_batches=)`: it keys each
    microbatch's batch transform and gather (`step * accumulate + j`, unique over the run).

    A step's microbatches are rows of a stack `(m, batch, ...)`, or, with `gather` (a
    device-resident loader, see `_train_input`), gathered from its data one at a time."""

    def __init__(
        self, steps: Any, accumulate: int, decode: Callable | None, gather: Callable | None
    ):
        self.steps = steps
        self.accumulate = accumulate
        self.decode = decode
        self.gather = gather

    def _batch(self, source: PyTree, step: jax.Array, j: jax.Array) -> PyTree:
        """Microbatch `j` of the optimizer step after global step `step`, as `train_step`
        receives it."""
        key = step * self.accumulate + j
        if self.gather is not None:
            batch = self.gather(source, key)
        else:
            batch = jax.tree.map(lambda x: x[j], source)
        batch = batch if self.decode is None else self.decode(batch)
        return self.steps._transformed(batch, key)

    def one(self, dyn, acc, source, reset, carries, step, m: int):
        """Traced: one optimizer step over `m` microbatches of `source`. Returns `(dyn, acc,
        per-microbatch metrics (m, ...) or None, carries, step + 1)`."""
        steps = self.steps
        exp = steps.combine(dyn)
        count = require_optimizers(exp, self.accumulate)
        shapes = call_shapes(exp, self._batch(source, step, jnp.int32(0)), count)
        rule = accumulation_rule(m)
        wants = carries is not None
        calls = _zeros(shapes) if wants and _reads_calls(steps) else None
        merged = _zeros(steps.layouts["train"].shapes) if wants else None

        def body(carry, j):
            dyn, acc, flag, sums, calls, merged = carry
            batch = self._batch(source, step, j)
            exp = steps.combine(dyn)
            taps: list = []

            def microbatch(policed: Experiment, batch: PyTree) -> tuple:
                # `policed`: the experiment as the precision policy hands it to the step
                tapped = tap(policed, rule, [(j, s) for s in sums])
                new, metrics = check_train_output(call_step(tapped, "train_step", batch), exp)
                new, taps[:] = untap(new, count)
                return new, metrics, calls_of(taps)

            new, metrics, _, _ = apply_policy(steps.policy, exp, batch, microbatch, None)
            new_dyn = steps._split_new(new, dyn)
            m_dyn = eqx.partition(metrics, eqx.is_array)[0]
            acc = steps._accumulate("train", acc, m_dyn, flag)
            if merged is not None:
                merged = steps._accumulate("train", merged, m_dyn, j == 0)
            if calls is not None:
                calls = calls_of(taps)
            sums = [t.carry[1] for t in taps]
            out = m_dyn if steps.keep_step_metrics else None
            seen = batch if wants else None  # (what in-step reductions see, stacked)
            return (new_dyn, acc, jnp.zeros_like(flag), sums, calls, merged), (out, seen)

        sums = [_sum_zeros(s.grads) for s in shapes]
        carry = (dyn, acc, reset, sums, calls, merged)
        (new_dyn, acc, _, _, calls, merged), (ms, batches) = jax.lax.scan(
            body, carry, jnp.arange(m, dtype=jnp.int32)
        )
        if carries is not None:
            data = StepData(
                steps.metrics("train", merged),
                batches,
                step + 1,
                steps.combine(new_dyn),
                exp,
                calls if calls is not None else (),
            )
            carries = {k: steps.in_steps[k].update(c, data) for k, c in carries.items()}
        return new_dyn, acc, ms, carries, step + 1

    def many(self, dyn, acc, source, reset, carries, step, n: int, m: int):
        """Traced: `n` optimizer steps of `m` microbatches on `source`: a stack `(n * m,
        batch, ...)` or gathered data (one `one` call, or a scan of them). Per-microbatch
        metrics come back as `(n * m, ...)`."""
        if n == 1:
            return self.one(dyn, acc, source, reset, carries, step, m)
        xs = None
        if self.gather is None:
            xs = jax.tree.map(lambda x: x.reshape(n, m, *x.shape[1:]), source)

        def body(carry, micro):
            dyn, acc, flag, carries, step = carry
            micro = source if micro is None else micro
            dyn, acc, ms, carries, step = self.one(dyn, acc, micro, flag, carries, step, m)
            return (dyn, acc, jnp.zeros_like(flag), carries, step), ms

        (dyn, acc, _, carries, step), ms = jax.lax.scan(
            body, (dyn, acc, reset, carries, step), xs, length=n
        )
        if ms is not None:
            ms = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), ms)
        return dyn, acc, ms, carries, step


def _reads_calls(steps: Any) -> bool:
    return any(s.uses_optimizer_calls for s in steps.in_steps.values())
