import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import solstice

SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=5, decay_steps=40)


def _params():
    return {
        "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
        "b": jnp.full((4,), 0.5),
        "frozen": None,
    }


@jax.jit
def _differentiable_grads(w, b, step):
    key = jax.random.fold_in(jax.random.key(0), step)

    def loss(p):
        noise = jax.random.normal(key, p["w"].shape)
        return jnp.sum((p["w"] - noise) ** 2) + jnp.sum(jnp.sin(p["b"]) * p["b"])

    return jax.grad(loss)({"w": w, "b": b})


def _grads(params, step):
    """Gradients that depend on the parameters and change from step to step."""
    return {**_differentiable_grads(params["w"], params["b"], step), "frozen": None}


def _run(update, state, steps):
    """Run `steps` updates from `_params()`; return every update and the final parameters."""
    params = _params()
    all_updates = []
    for step in range(steps):
        updates, state = update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return all_updates, params, state


def _run_solstice(optimizer, steps):
    def update(grads, optimizer, params):
        return optimizer(grads, params)

    return _run(update, optimizer, steps)


def _run_optax(transformation, steps):
    return _run(transformation.update, transformation.init(_params()), steps)


def _assert_trees_close(a, b, exact=False):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# SGDOptimizer


@pytest.mark.parametrize("learning_rate", [0.05, SCHEDULE], ids=["float", "schedule"])
@pytest.mark.parametrize(
    "momentum,nesterov",
    [(0.0, False), (0.9, False), (0.9, True)],
    ids=["plain", "momentum", "nesterov"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["no_wd", "wd"])
def test_sgd_matches_optax(learning_rate, momentum, nesterov, weight_decay):
    steps = 50
    ours = solstice.SGDOptimizer(_params(), learning_rate, momentum, nesterov, weight_decay)
    reference = optax.sgd(learning_rate, momentum, nesterov)
    if weight_decay > 0:
        reference = optax.chain(optax.add_decayed_weights(weight_decay), reference)
    our_updates, our_params, ours = _run_solstice(ours, steps)
    ref_updates, ref_params, _ = _run_optax(reference, steps)
    for ours_step, ref_step in zip(our_updates, ref_updates):
        _assert_trees_close(ours_step, ref_step)
    _assert_trees_close(our_params, ref_params)
    assert int(ours.count) == steps


def test_sgd_current_learning_rate():
    constant = solstice.SGDOptimizer(_params(), 0.1)
    assert float(constant.current_learning_rate()) == pytest.approx(0.1)
    scheduled = solstice.SGDOptimizer(_params(), SCHEDULE, momentum=0.9)
    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE, momentum=0.9)
    injected_state = injected.init(_params())
    params = _params()
    for step in range(8):
        # The learning rate of the most recent update, as `inject_hyperparams` records it.
        assert float(scheduled.current_learning_rate()) == pytest.approx(
            float(SCHEDULE(max(step - 1, 0)))
        )
        assert float(scheduled.current_learning_rate()) == pytest.approx(
            float(injected_state.hyperparams["learning_rate"])
        )
        grads = _grads(params, step)
        _, scheduled = scheduled(grads)
        _, injected_state = injected.update(grads, injected_state)


def test_sgd_with_equinox_model_under_filter_jit(getkey):
    model = eqx.nn.MLP(2, 1, width_size=8, depth=2, key=getkey())
    x = jax.random.normal(getkey(), (32, 2))
    y = jnp.sum(x, axis=1, keepdims=True)
    optimizer = solstice.SGDOptimizer(model, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    reference = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, 0.9, nesterov=True))
    ref_state = reference.init(eqx.filter(model, eqx.is_array))
    # The momentum trace holds the model's arrays; activations etc. are None.
    assert jax.tree.structure(optimizer.trace) == jax.tree.structure(
        eqx.filter(model, eqx.is_inexact_array)
    )

    def loss_fn(model):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    def step(model, optimizer):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, optimizer = optimizer(grads, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), optimizer, loss

    @eqx.filter_jit
    def ref_step(model, state):
        grads = eqx.filter_grad(loss_fn)(model)
        updates, state = reference.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state

    ref_model = model
    losses = []
    for _ in range(30):
        model, optimizer, loss = step(model, optimizer)
        ref_model, ref_state = ref_step(ref_model, ref_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert int(optimizer.count) == 30
    _assert_trees_close(eqx.filter(model, eqx.is_array), eqx.filter(ref_model, eqx.is_array))


def test_sgd_skips_integer_arrays():
    params = {"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)}
    optimizer = solstice.SGDOptimizer(params, 0.1, momentum=0.5, weight_decay=0.1)
    assert optimizer.trace["steps"] is None
    updates, optimizer = optimizer({"w": jnp.ones(3), "steps": None}, params)
    assert updates["steps"] is None
    np.testing.assert_allclose(updates["w"], -0.1 * 1.1 * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(learning_rate=-0.1),
            ValueError,
            r"`learning_rate` must be a finite number >= 0, but got -0.1",
        ),
        (dict(learning_rate=float("nan")), ValueError, "`learning_rate` must be a finite"),
        (dict(learning_rate="0.1"), TypeError, "`learning_rate` must be a number.*str"),
        (
            dict(learning_rate=0.1, momentum=-0.9),
            ValueError,
            "`momentum` must be.*-0.9.*momentum=0.9",
        ),
        (dict(learning_rate=0.1, weight_decay=-1.0), ValueError, "`weight_decay` must be.*-1.0"),
        (
            dict(learning_rate=0.1, nesterov=True),
            ValueError,
            "`nesterov=True` needs momentum.*momentum=0.9, nesterov=True",
        ),
    ],
)
def test_sgd_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        solstice.SGDOptimizer(_params(), **kwargs)


def test_sgd_weight_decay_needs_params():
    optimizer = solstice.SGDOptimizer(_params(), 0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match=r"weight_decay=0.01.*`params` is None.*eqx.filter"):
        optimizer(_grads(_params(), 0))
    # Without weight decay params are optional.
    solstice.SGDOptimizer(_params(), 0.1)(_grads(_params(), 0))


def test_sgd_accepts_numpy_scalars():
    optimizer = solstice.SGDOptimizer(_params(), np.float32(0.1), momentum=np.float64(0.5))
    assert isinstance(optimizer.learning_rate, float)
    assert isinstance(optimizer.momentum, float)


# OptaxOptimizer


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.adam(1e-2),
        lambda: optax.adamw(1e-2, weight_decay=0.1),
        lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=SCHEDULE, weight_decay=0.1),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(SCHEDULE, momentum=0.9)),
        lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=3),
    ],
    ids=["adam", "adamw", "inject_hyperparams", "chain", "schedule_free"],
)
def test_optax_optimizer_matches_raw_optax(make):
    steps = 10
    ours = solstice.OptaxOptimizer(make(), _params())
    our_updates, our_params, ours = _run_solstice(ours, steps)
    ref_updates, ref_params, ref_state = _run_optax(make(), steps)
    for ours_step, ref_step in zip(our_updates, ref_updates):
        _assert_trees_close(ours_step, ref_step, exact=True)
    _assert_trees_close(our_params, ref_params, exact=True)
    _assert_trees_close(ours.opt_state, ref_state, exact=True)


def test_optax_optimizer_lookahead():
    make = lambda: optax.lookahead(optax.adam(1e-2), sync_period=3, slow_step_size=0.5)  # noqa: E731
    params = optax.LookaheadParams.init_synced(_params())
    ours = solstice.OptaxOptimizer(make(), params)
    reference = make()
    ref_state = reference.init(params)
    ref_params = our_params = params
    for step in range(7):
        grads = _grads(our_params.fast, step)
        updates, ours = ours(grads, our_params)
        ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
        _assert_trees_close(updates, ref_updates, exact=True)
        our_params = optax.apply_updates(our_params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    _assert_trees_close(our_params, ref_params, exact=True)


def test_optax_optimizer_extra_args():
    """`optax.contrib.reduce_on_plateau` takes the loss as `value=`."""
    make = lambda: optax.chain(  # noqa: E731
        optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5, accumulation_size=1)
    )
    ours = solstice.OptaxOptimizer(make(), _params())
    reference = make()
    ref_state = reference.init(_params())
    grads = _grads(_params(), 0)
    for _ in range(4):  # a loss that never improves: the scale halves
        updates, ours = ours(grads, _params(), value=jnp.float32(1.0))
        ref_updates, ref_state = reference.update(
            grads, ref_state, _params(), value=jnp.float32(1.0)
        )
        _assert_trees_close(updates, ref_updates, exact=True)
    assert float(ours.opt_state[1].scale) < 1.0


def test_optax_current_learning_rate():
    plain = solstice.OptaxOptimizer(optax.adam(1e-3), _params())
    assert plain.current_learning_rate() is None
    # Found through `optax.chain`, and it is the rate of the most recent update.
    optimizer = solstice.OptaxOptimizer(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE),
        ),
        _params(),
    )
    params = _params()
    for step in range(8):
        updates, optimizer = optimizer(_grads(params, step), params)
        params = optax.apply_updates(params, updates)
        hyperparams = optimizer.opt_state[1].hyperparams
        assert float(hyperparams["learning_rate"]) == pytest.approx(float(SCHEDULE(step)))
        assert optimizer.current_learning_rate() is hyperparams["learning_rate"]


def test_optax_optimizer_with_equinox_model_under_filter_jit(getkey):
    model = eqx.nn.MLP(2, 1, width_size=8, depth=2, key=getkey())
    x = jax.random.normal(getkey(), (32, 2))
    y = jnp.sum(x, axis=1, keepdims=True)
    transformation = optax.adamw(1e-2, weight_decay=1e-4)
    optimizer = solstice.OptaxOptimizer(transformation, model)
    ref_state = transformation.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @eqx.filter_jit
    def step(model, optimizer):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, optimizer = optimizer(grads, model)  # a whole model is fine as `params`
        return eqx.apply_updates(model, updates), optimizer, loss

    @eqx.filter_jit
    def ref_step(model, state):
        grads = eqx.filter_grad(loss_fn)(model)
        updates, state = transformation.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state

    ref_model = model
    losses = []
    for _ in range(20):
        model, optimizer, loss = step(model, optimizer)
        ref_model, ref_state = ref_step(ref_model, ref_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    _assert_trees_close(eqx.filter(model, eqx.is_array), eqx.filter(ref_model, eqx.is_array))


class _Holder(eqx.Module):
    params: dict
    optimizer: solstice.Optimizer


@pytest.mark.parametrize(
    "make",
    [
        lambda p: solstice.OptaxOptimizer(
            optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE), p
        ),
        lambda p: solstice.SGDOptimizer(p, SCHEDULE, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["optax", "sgd"],
)
def test_optimizer_as_module_field_survives_jit_and_scan(make):
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
    holder = _Holder(params, make(params))

    def train_step(holder, step):
        grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]))(holder.params)
        updates, optimizer = holder.optimizer(grads, holder.params)
        new = _Holder(optax.apply_updates(holder.params, updates), optimizer)
        return new, optimizer.current_learning_rate()

    jitted = jax.jit(train_step)
    eager = holder
    for step in range(3):
        holder, _ = jitted(holder, step)
        eager, _ = train_step(eager, step)
    assert type(holder.optimizer) is type(eager.optimizer)
    assert jax.tree.structure(holder) == jax.tree.structure(eager)
    _assert_trees_close(holder.params, eager.params)

    # The optimizer keeps its pytree structure from step to step, so it can be a scan carry.
    scanned, rates = jax.jit(lambda h: jax.lax.scan(train_step, h, jnp.arange(5)))(holder)
    assert jax.tree.structure(scanned) == jax.tree.structure(holder)
    np.testing.assert_allclose(rates, [SCHEDULE(i) for i in range(3, 8)], rtol=1e-6)


def test_optimizers_are_optimizers():
    for optimizer in (
        solstice.OptaxOptimizer(optax.sgd(0.1), _params()),
        solstice.SGDOptimizer(_params(), 0.1),
    ):
        assert isinstance(optimizer, solstice.Optimizer)
        updates, new = optimizer(_grads(_params(), 0), _params())
        assert type(new) is type(optimizer)
        assert jax.tree.structure(updates) == jax.tree.structure(_grads(_params(), 0))


def test_optax_optimizer_rejects_non_transformations():
    with pytest.raises(TypeError, match="`optax.GradientTransformation`.*function.*call it"):
        solstice.OptaxOptimizer(optax.adam, _params())
    with pytest.raises(TypeError, match="got 'adam' of type str"):
        solstice.OptaxOptimizer("adam", _params())
    with pytest.raises(TypeError, match=r"MultiSteps.*gradient_transformation\(\)"):
        solstice.OptaxOptimizer(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2), _params())
    # ... and the fix works.
    accumulating = solstice.OptaxOptimizer(
        optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation(), _params()
    )
    updates, accumulating = accumulating(_grads(_params(), 0), _params())
    assert float(jnp.sum(jnp.abs(updates["w"]))) == 0.0  # the first of two accumulated steps
