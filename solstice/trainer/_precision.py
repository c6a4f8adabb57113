"""Precision policies (`Trainer(precision=...)`): in which dtype the steps compute, and in
which the experiment is kept.

- `"32-true"`: as written (the default).
- `"bf16-mixed"`, `"16-mixed"`: the experiment keeps its dtypes (float32 masters, in the run
  and in checkpoints). Inside each compiled step, its floating leaves outside its
  `solstice.Optimizer`s (the model, batch-norm state, ...) and the batch's are cast to the
  compute dtype, and the step runs on that copy (`apply_policy`). Each optimizer is tapped
  (`PolicyRule`): it receives the gradients and parameters in float32, so its state and
  updates stay float32. What the step changed in each cast leaf is then added to its master
  in the master's dtype: `master + (returned - low)`, i.e. `master + updates` for parameters
  updated with `eqx.apply_updates`. `"16-mixed"` also scales the loss (`scale_loss`), divides
  the gradients by the scale, skips the optimizers' step when they are not finite and adapts
  the scale (`DynamicScaling`), whose state is an in-step state (checkpointed).
- `"bf16-true"`: every floating leaf of the experiment, the optimizer state included, is cast
  to bfloat16 when a run starts, and each batch's in the step.

Composing with other optimizer taps (microbatching): `apply_policy` wraps whatever `call`
runs the step. Its `PolicyTap` keeps one structure across calls (it may sit in a `lax.scan`
carry), but the model it updates does not: bf16 weights plus float32 updates are float32.
So a loop inside the step must not carry the model across an optimizer call; run the last
update outside the loop, or call `apply_policy` inside the loop's body (its carry is then
the float32 masters).

Evaluation and prediction compute in the same dtype. Metrics come back in float32 (their sums
and confusion counts accumulate over a whole epoch); predictions in float32 under the mixed
policies (the dtype of the parameters, jmp's "output dtype"), as returned under `bf16-true`.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._in_step import InStep, StepData
from .._loss_scaling import DynamicScaling, LossScale, loss_scaling
from .._optimizer import Optimizer
from .._optimizer_tap import OptimizerCall, optimizers_of, untap

LOSS_SCALE = "loss_scale"  # the in-step state of `16-mixed`'s dynamic loss scale


def _is_optimizer(x: Any) -> bool:
    return isinstance(x, Optimizer)


def _is_float(x: Any) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """`tree` with every floating array leaf cast to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree)


def upcast(tree: PyTree, dtype: Any) -> PyTree:
    """`tree` with its leaves of dtype `dtype` in float32."""
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_array(x) and x.dtype == dtype else x, tree
    )


def _outside_optimizers(tree: PyTree, fn: Callable[[Any], Any]) -> PyTree:
    return jax.tree.map(lambda x: x if _is_optimizer(x) else fn(x), tree, is_leaf=_is_optimizer)


def _select(flag: jax.Array, if_true: PyTree, if_false: PyTree) -> PyTree:
    """`if_true` where `flag`, else `if_false`, array by array (a module keeps its other
    fields from `if_true`)."""
    true_arrays, rest = eqx.partition(if_true, eqx.is_array)
    false_arrays = eqx.filter(if_false, eqx.is_array)
    chosen = jax.tree.map(lambda a, b: jnp.where(flag, a, b), true_arrays, false_arrays)
    return eqx.combine(chosen, rest)


def _all_finite(tree: PyTree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class PolicyRule:
    """The `TapRule` of the mixed policies: the wrapped optimizer gets the gradients and
    parameters in float32; with `scaling`, the gradients divided by the loss scale (the
    tap's carry: `{"scale", "finite"}`), and when they are not all finite, zero updates and
    the optimizer unchanged (the carry's `finite` records it)."""

    compute: Any
    scaling: bool

    def unscale(self, grads: PyTree, scale: jax.Array) -> PyTree:
        """The gradients of a scaled loss in float32, divided by the scale."""
        grads = upcast(grads, self.compute)
        return jax.tree.map(lambda g: g / scale if _is_float(g) else g, grads)

    def __call__(
        self, inner: Optimizer, grads: PyTree, params: PyTree, extra_args: dict, carry: Any
    ) -> tuple[PyTree, Optimizer, Any, PyTree]:
        grads = upcast(grads, self.compute)
        params = None if params is None else upcast(params, self.compute)
        if not self.scaling:
            updates, stepped = inner(grads, params, **extra_args)
            return updates, stepped, carry, grads
        grads = self.unscale(grads, carry["scale"])
        finite = _all_finite(grads)
        updates, stepped = inner(grads, params, **extra_args)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_carry = {"scale": carry["scale"], "finite": finite & carry["finite"]}
        return updates, _select(finite, stepped, inner), new_carry, grads


class PolicyTap(Optimizer):
    """An `Optimizer` wrapped for one training step under a mixed policy: calls go through
    `rule` (a `PolicyRule`), whose carry it keeps. Unlike the optimizer tap's `Tap`, it
    records nothing, so it has the same structure before and after its call (it may travel
    through a `lax.scan` over microbatches, inside another tap)."""

    inner: Optimizer
    carry: Any
    rule: PolicyRule = eqx.field(static=True)

    def __call__(
        self, grads: PyTree, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, "PolicyTap"]:
        updates, inner, carry, _ = self.rule(self.inner, grads, params, extra_args, self.carry)
        return updates, PolicyTap(inner, carry, self.rule)

    def current_learning_rate(self) -> Any:
        return self.inner.current_learning_rate()

    def with_learning_rate(self, learning_rate: Any) -> "PolicyTap":
        """The wrapped optimizer's `with_learning_rate` (for `lr_find`), wrapped again."""
        inner = getattr(self.inner, "with_learning_rate")(learning_rate)  # noqa: B009
        return PolicyTap(inner, self.carry, self.rule)

    def __getattr__(self, name: str) -> Any:
        # `train_step` may read its optimizer's own fields (`self.optimizer.opt_state`).
        if name in ("inner", "carry", "rule") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _wrap(experiment: PyTree, rule: PolicyRule, carry: Any) -> PyTree:
    wrap = lambda x: PolicyTap(x, carry, rule) if _is_optimizer(x) else x  # noqa: E731
    return jax.tree.map(wrap, experiment, is_leaf=_is_optimizer)


def _unwrap(experiment: PyTree, expected: int) -> tuple[PyTree, list[PolicyTap]]:
    """`experiment` with its `PolicyTap`s unwrapped, and them; `untap`'s error if the step
    did not keep `expected` of them."""
    taps: list[PolicyTap] = []

    def unwrap(x: Any) -> Any:
        if isinstance(x, PolicyTap):
            taps.append(x)
            return x.inner
        return x

    unwrapped = jax.tree.map(unwrap, experiment, is_leaf=_is_optimizer)
    if len(taps) != expected:
        untap(experiment, expected)  # raises, naming the mistake
    return unwrapped, taps


class LossScaleState(InStep):
    """Where `16-mixed` keeps its `LossScale` between steps (and in checkpoints). The
    compiled step itself advances it (`apply_policy`): `update` passes it on."""

    def __init__(self, scaling: DynamicScaling):
        self.scaling = scaling

    def init(self, experiment: Any = None) -> LossScale:
        return self.scaling.init()

    def update(self, carry: LossScale, data: StepData) -> LossScale:
        return carry


@dataclasses.dataclass(frozen=True)
class Policy:
    """A precision policy (see the module's docstring): `compute` is the dtype the steps
    compute in (`None`: as written); `mixed` keeps the experiment's own dtypes as masters;
    `scaling` scales the loss dynamically."""

    name: str
    compute: Any = None
    mixed: bool = False
    scaling: DynamicScaling | None = None

    def start(self, experiment: PyTree) -> PyTree:
        """The experiment a run starts from: under `bf16-true`, every floating leaf in
        bfloat16; otherwise `experiment`."""
        if self.compute is None or self.mixed:
            return experiment
        return cast_floating(experiment, self.compute)

    def evaluate(self, experiment: PyTree, batch: PyTree, fn: Callable, *, metrics: bool) -> Any:
        """Traced: `fn(experiment, batch)` (an `eval_step` or `predict_step`) in the compute
        dtype; its metrics (`metrics=True`) in float32, its predictions in float32 under
        the mixed policies."""
        if self.compute is None:
            return fn(experiment, batch)
        batch = cast_floating(batch, self.compute)
        if self.mixed:
            low = lambda x: x.astype(self.compute) if _is_float(x) else x  # noqa: E731
            experiment = _outside_optimizers(experiment, low)
        out = fn(experiment, batch)
        return upcast(out, self.compute) if (metrics or self.mixed) else out


def _onto_masters(master: PyTree, low: PyTree, new: PyTree) -> PyTree:
    """Each cast leaf of `new` as its master plus what the step changed (`new - low`), in
    the master's dtype; optimizers and other leaves as `new` has them."""
    m_leaves, m_def = jax.tree.flatten(master, is_leaf=_is_optimizer)
    n_leaves, n_def = jax.tree.flatten(new, is_leaf=_is_optimizer)
    if not bool(m_def == n_def):  # type: ignore[operator]  # reported by the step's check
        return new
    l_leaves = jax.tree.leaves(low, is_leaf=_is_optimizer)  # `master`'s structure

    def merge(m: Any, lo: Any, n: Any) -> Any:
        if _is_optimizer(m) or not (_is_float(m) and _is_float(n)) or m.shape != n.shape:
            return n
        if m.dtype == lo.dtype:
            return n.astype(m.dtype)
        return m + (n.astype(m.dtype) - lo.astype(m.dtype))

    merged = [merge(*leaves) for leaves in zip(m_leaves, l_leaves, n_leaves, strict=True)]
    return jax.tree.unflatten(m_def, merged)


StepCall = Callable[[PyTree, PyTree], tuple[Any, Any, tuple[OptimizerCall, ...]]]


def apply_policy(
    policy: Policy, experiment: PyTree, batch: PyTree, call: StepCall, carries: dict | None
) -> tuple[Any, Any, tuple[OptimizerCall, ...], dict | None]:
    """Traced: `call(experiment, batch) -> (new, metrics, optimizer_calls)` (the training
    step) under `policy`; returns the same and the in-step `carries` (the loss scale
    advanced under `16-mixed`)."""
    if policy.compute is None:
        return (*call(experiment, batch), carries)
    batch = cast_floating(batch, policy.compute)
    if not policy.mixed:
        new, metrics, calls = call(experiment, batch)
        return new, upcast(metrics, policy.compute), calls, carries
    low = _outside_optimizers(experiment, lambda x: x.astype(policy.compute) if _is_float(x) else x)
    count = len(optimizers_of(experiment))
    state = _loss_scale(policy, experiment, count, carries)
    carry = None if state is None else {"scale": state.scale, "finite": jnp.asarray(True)}
    rule = PolicyRule(policy.compute, state is not None)
    tapped = _wrap(low, rule, carry) if count else low
    scale = jnp.asarray(1.0, jnp.float32) if state is None else state.scale
    with loss_scaling(scale) as scaling, _explain_loop_carries(policy):
        new, metrics, calls = call(tapped, batch)
    if state is not None and not scaling.used:
        _raise_unscaled(experiment)
    taps: list[PolicyTap] = []
    if count:
        new, taps = _unwrap(new, count)
    # What the optimizers saw: the gradients in float32, unscaled, and the parameters.
    calls = tuple(
        OptimizerCall(
            upcast(c.grads, policy.compute) if state is None else rule.unscale(c.grads, scale),
            upcast(c.params, policy.compute),
            c.updates,
        )
        for c in calls
    )
    new = _onto_masters(experiment, low, new)
    if state is not None and carries is not None and policy.scaling is not None:
        finite = jnp.all(jnp.stack([t.carry["finite"] for t in taps]))
        carries = {**carries, LOSS_SCALE: policy.scaling.adjust(state, finite)}
    return new, upcast(metrics, policy.compute), calls, carries


@contextlib.contextmanager
def _explain_loop_carries(policy: Policy) -> Iterator[None]:
    """A `TypeError` while tracing the step (a loop whose carry changed dtype: the model
    updated inside the step's own `lax.scan`) gets a note saying why, and what to do."""
    try:
        yield
    except TypeError as error:
        if "carry" in str(error) and hasattr(error, "add_note"):
            error.add_note(
                f'(Solstice) Under `precision="{policy.name}"` the step runs on a '
                f"{jnp.dtype(policy.compute).name} copy of the model and the optimizer's "
                "updates are float32, so a parameter updated inside a loop of the step "
                "(`lax.scan`, `fori_loop`) comes out float32. Update the model once per "
                'step (outside loops), or use `precision="bf16-true"` or "32-true".'
            )
        raise


def _loss_scale(
    policy: Policy, experiment: PyTree, count: int, carries: dict | None
) -> LossScale | None:
    """The loss scale of this step (under `16-mixed`), checking it can be applied."""
    if policy.scaling is None:
        return None
    if count == 0:
        raise ValueError(
            f'`precision="{policy.name}"` divides the gradients by the loss scale in the '
            f"optimizer call, but `{type(experiment).__name__}` holds no `solstice.Optimizer` "
            "(an optax state kept by hand is invisible to the Trainer). Wrap the optax "
            'transformation in `solstice.OptaxOptimizer`, or use `precision="bf16-mixed"`, '
            "which needs no loss scaling."
        )
    if carries is None or LOSS_SCALE not in carries:  # tracing the step's shapes only
        return policy.scaling.init()
    return carries[LOSS_SCALE]


def _raise_unscaled(experiment: PyTree) -> None:
    name = type(experiment).__name__
    raise ValueError(
        f'`precision="16-mixed"` scales the loss so that float16 gradients do not underflow, '
        f"but `{name}.train_step` never called `solstice.scale_loss`. Return "
        "`solstice.scale_loss(loss)` from the loss function you differentiate (report the "
        'unscaled loss in the metrics), or use `precision="bf16-mixed"`.'
    )


POLICIES = {
    "32-true": Policy("32-true"),
    "bf16-mixed": Policy("bf16-mixed", jnp.bfloat16, mixed=True),
    "16-mixed": Policy("16-mixed", jnp.float16, mixed=True, scaling=DynamicScaling()),
    "bf16-true": Policy("bf16-true", jnp.bfloat16),
}


def policy_for(precision: Any) -> Policy:
    """The policy named `precision`; raises naming the valid ones."""
    if not isinstance(precision, str) or precision not in POLICIES:
        aliases = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": None}
        hint = aliases.get(str(precision))
        fix = f" Did you mean `precision={hint!r}`?" if hint else ""
        raise ValueError(
            f"`precision={precision!r}` is not a precision policy. Use one of "
            f"{', '.join(repr(p) for p in POLICIES)} (Lightning's names).{fix}"
        )
    return POLICIES[precision]
