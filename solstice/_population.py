"""`Population`: many experiments of one structure, trained as one vmapped program."""

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from ._experiment import Experiment
from ._hook_names import HOOK_NAMES
from ._optimizer_tap import optimizers_of
from ._population_metrics import PopulationMetrics
from ._population_structure import difference

if TYPE_CHECKING:
    from ._view import TrainerView

DATA_MODES = ("shared", "bootstrap")


def _overridden_hooks(cls: type) -> list[str]:
    return sorted(
        name for name in HOOK_NAMES if getattr(cls, name) is not getattr(Experiment, name)
    )


def _check_members(members: Sequence[Any]) -> None:
    if isinstance(members, Experiment) or not isinstance(members, Sequence) or not members:
        raise TypeError(
            "`Population(members)` takes a non-empty list of experiments, got "
            f"{members!r}. Build them in a list (`[make(i) for i in range(8)]`), or use "
            "`Population.build(make, n=8)`."
        )
    for i, member in enumerate(members):
        if not isinstance(member, Experiment) or isinstance(member, Population):
            raise TypeError(
                f"`Population` member {i} is a `{type(member).__name__}`; members must be "
                "`solstice.Experiment`s (and not populations themselves)."
            )
    hooks = _overridden_hooks(type(members[0]))
    if hooks:
        raise ValueError(
            f"`{type(members[0]).__name__}` overrides the hook(s) {', '.join(hooks)}, but a "
            "`Population` does not call its members' hooks (they would run once for all "
            "members, not per member). Move that work into a callback, or into `train_step`."
        )
    for i, member in enumerate(members[1:], start=1):
        found = difference(members[0], member)
        if found:
            raise ValueError(
                f"`Population` members must share one structure, but member {i} differs from "
                f"member 0 at {found}. Build every member the same way, differing only in "
                "array values. A hyperparameter baked into the structure as a Python value "
                "(e.g. `optax.adam(learning_rate)` with a different float per member) must "
                "become an array: use `optax.inject_hyperparams(optax.adam)(learning_rate="
                "lr)`, whose rate lives in the optimizer state, or hold it in an array field."
            )


def _record(hparams: Mapping[str, Sequence[Any]] | None, size: int) -> tuple:
    if hparams is None:
        return ()
    record = []
    for name, values in hparams.items():
        values = list(np.asarray(values).tolist()) if isinstance(values, np.ndarray) else values
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(
                f"Hyperparameter `{name}` must be a sequence of one value per member, got "
                f"{values!r}."
            )
        if len(values) != size:
            raise ValueError(
                f"Hyperparameter `{name}` has {len(values)} values for {size} members; give "
                "one value per member."
            )
        record.append(
            (name, tuple(v if isinstance(v, (int, float, str, bool)) else repr(v) for v in values))
        )
    return tuple(record)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stack_leaf(values: list[Any]) -> jax.Array:
    """One stacked array, built on the host (eager `jnp.stack` would compile per shape)."""
    if _is_key(values[0]):
        data = np.stack([np.asarray(jr.key_data(v)) for v in values])
        return jr.wrap_key_data(jnp.asarray(data), impl=jr.key_impl(values[0]))
    return jnp.asarray(np.stack([np.asarray(v) for v in values]))


def _stack(members: Sequence[Experiment]) -> Experiment:
    dyn, static = eqx.partition(members[0], eqx.is_array)
    leaves = [jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in members]
    stacked = [_stack_leaf([m[k] for m in leaves]) for k in range(len(leaves[0]))]
    return eqx.combine(jax.tree.unflatten(jax.tree.structure(dyn), stacked), static)


@jax.jit
def _take(arrays: PyTree, index: jax.Array) -> PyTree:
    """Every array's entry `index` of its leading axis: one compiled call for all of them."""
    return jax.tree.map(lambda x: x[index], arrays)


def _keep(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """`new` where `active` (one flag per member, the leading axis), else `old`."""

    def leaf(n: Any, o: Any) -> Any:
        if not eqx.is_array(n):
            return n
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(leaf, new, old)


class Population(Experiment):
    """Many experiments of one structure, stacked and trained as one program by vmapping
    their steps over a leading member axis: one compiled step, one dispatch, batched
    arithmetic, through the ordinary `Trainer`, DataModules and callbacks.

    Every array of the members gains a leading axis of size `size`; the non-array part
    (classes, configuration, functions) is member 0's and must be the same for all, else
    `ValueError` names the first difference. `train_step` maps the members' `train_step`
    over that axis: every member sees the same batch (`data="shared"`) or its own resample
    of the batch's rows with replacement (`data="bootstrap"`: bagging; the draws come from a
    per-member key carried in the population, so a resumed run continues exactly).
    Evaluation always uses the shared batch. Metrics are `PopulationMetrics`:
    `val/member_3/accuracy` for each member and `val/population/mean/accuracy` (also `min`,
    `max`) over all of them.

    Members can be stopped (`with_active`, `solstice.callbacks.PopulationEarlyStopping`):
    a stopped member's arrays (parameters, optimizer state, keys) are kept exactly while the
    others train, and its evaluation metrics are still computed. `member(i)` returns member
    `i` as an ordinary experiment, for any `Trainer`, `solstice.save` or
    `solstice.callbacks.PopulationCheckpoint`.

    `predict_step` returns the members' predictions with the member axis *second*
    (`(batch, size, ...)`), since the Trainer concatenates predictions along the first.
    The members' hooks are not called (a member class that overrides one is refused), and
    features that wrap the optimizer call inside the step (`precision="bf16-mixed"` /
    `"16-mixed"`, `accumulate_grad_batches`, `NormMonitor`) or set one value for all members
    (`lr_find`) are refused when the step is compiled, before it runs.

    **Arguments:**

    - `members`: a list of experiments of one structure (same class, configuration, array
      shapes and dtypes; values may differ).
    - `data`: `"shared"` (every member trains on the batch) or `"bootstrap"`.
    - `seed`: the seed of the bootstrap draws (member `i` draws from
      `jax.random.split(jax.random.key(seed), size)[i]`).
    - `member_metrics`: the metric names reported per member (`member_{i}/{name}`); `None`
      (the default): all. The population summaries cover every metric either way.
    - `hparams`: one value per member for each named hyperparameter, recorded for reports
      (`population.hparams`); `Population.build` fills it.

    **Example:**

    ```python
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)

    def make(index, lr):
        model = eqx.nn.MLP(64, 10, 32, 1, key=jax.random.key(index))
        optimizer = solstice.OptaxOptimizer(tx, model).with_learning_rate(lr)
        return solstice.ClassificationExperiment(model, optimizer, num_classes=10)

    population = solstice.Population.build(make, lr=[0.01, 0.03, 0.1, 0.3])
    population.size, population.hparams["lr"]  # 4, [0.01, 0.03, 0.1, 0.3]
    ```
    """

    members: Experiment
    active: jax.Array
    keys: jax.Array | None
    size: int = eqx.field(static=True)
    data: str = eqx.field(static=True)
    member_metrics: tuple[str, ...] | None = eqx.field(static=True)
    hparam_record: tuple = eqx.field(static=True)
    optimizer_types: tuple[type, ...] = eqx.field(static=True)

    def __init__(
        self,
        members: Sequence[Experiment],
        *,
        data: str = "shared",
        seed: int = 0,
        member_metrics: Sequence[str] | None = None,
        hparams: Mapping[str, Sequence[Any]] | None = None,
    ):
        _check_members(members)
        if data not in DATA_MODES:
            raise ValueError(
                f"`Population(data={data!r})`: `data` must be 'shared' (every member trains "
                "on the same batch) or 'bootstrap' (each resamples the batch's rows)."
            )
        if isinstance(member_metrics, str):
            raise TypeError(
                f"`Population(member_metrics={member_metrics!r})` takes a sequence of metric "
                f"names: `member_metrics=({member_metrics!r},)`."
            )
        size = len(members)
        self.members = _stack(members)
        self.active = jnp.ones(size, bool)
        self.keys = jr.split(jr.key(seed), size) if data == "bootstrap" else None
        self.size = size
        self.data = data
        self.member_metrics = None if member_metrics is None else tuple(member_metrics)
        self.hparam_record = _record(hparams, size)
        self.optimizer_types = tuple(type(o) for o in optimizers_of(members[0]))

    @classmethod
    def build(
        cls,
        make: Callable[..., Experiment],
        n: int | None = None,
        *,
        data: str = "shared",
        seed: int = 0,
        member_metrics: Sequence[str] | None = None,
        **hparams: Sequence[Any],
    ) -> "Population":
        """A population of `make(index, **{name: values[index]})` for every member index.

        **Arguments:**

        - `make`: builds member `index` from its index and its hyperparameters.
        - `n`: the number of members; may be left out when hyperparameters are given
          (their common length).
        - `data`, `seed`, `member_metrics`: as for `Population`.
        - `**hparams`: sequences of one value per member (`lr=[1e-3, 3e-3, 1e-2]`),
          recorded in `population.hparams`.

        **Returns:** the `Population`.
        """
        for name, values in hparams.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
                raise TypeError(
                    f"`Population.build({name}={values!r})`: a hyperparameter takes one value "
                    f"per member, e.g. `{name}=[1e-3, 1e-2]`."
                )
        lengths = {name: len(values) for name, values in hparams.items()}
        if n is None:
            if not lengths:
                raise ValueError(
                    "`Population.build(make)` needs the number of members: pass `n=` or "
                    "hyperparameter sequences (`lr=[1e-3, 1e-2]`)."
                )
            n = next(iter(lengths.values()))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`Population.build(n={n!r})`: `n` must be an int >= 1.")
        wrong = {name: length for name, length in lengths.items() if length != n}
        if wrong:
            raise ValueError(
                f"`Population.build`: every hyperparameter needs one value per member ({n}), "
                f"but got lengths {wrong}."
            )
        members = [make(i, **{k: v[i] for k, v in hparams.items()}) for i in range(n)]
        return cls(members, data=data, seed=seed, member_metrics=member_metrics, hparams=hparams)

    # ---- members
    @property
    def hparams(self) -> dict[str, list[Any]]:
        """The recorded hyperparameters: name -> one value per member."""
        return {name: list(values) for name, values in self.hparam_record}

    def member_hparams(self, index: int) -> dict[str, Any]:
        """Member `index`'s hyperparameters: name -> value."""
        self._check_index(index)
        return {name: values[index] for name, values in self.hparam_record}

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"A member index must be an int, got {index!r}.")
        if not 0 <= index < self.size:
            raise IndexError(
                f"Member index {index} is out of range for a population of {self.size}; "
                f"use 0 to {self.size - 1}."
            )

    def member(self, index: int) -> Experiment:
        """Member `index` as an ordinary experiment (its arrays, the shared non-array part)."""
        self._check_index(index)
        dyn, static = eqx.partition(self.members, eqx.is_array)
        return eqx.combine(_take(dyn, jnp.asarray(index, jnp.int32)), static)

    def with_active(self, active: Any) -> "Population":
        """This population with `active` (one bool per member) as its active members: the
        others keep their arrays exactly in training steps."""
        active = jnp.asarray(active)
        if active.shape != (self.size,) or active.dtype != jnp.bool_:
            raise ValueError(
                f"`with_active` takes one bool per member, shape ({self.size},), got shape "
                f"{active.shape} dtype {active.dtype}."
            )
        return eqx.tree_at(lambda p: p.active, self, active)

    @property
    def honours_mask(self) -> bool:  # type: ignore[override]
        """The members' `honours_mask`."""
        return type(self.members).honours_mask

    # ---- steps
    def _check_optimizers(self) -> None:
        found = tuple(type(o) for o in optimizers_of(self.members))
        if found != self.optimizer_types:
            names = ", ".join(t.__name__ for t in found)
            raise ValueError(
                f"The Trainer wrapped the population's optimizers (now {names}) for a feature "
                "that reads or changes the optimizer call inside the training step: "
                "`precision='bf16-mixed'`/`'16-mixed'`, `accumulate_grad_batches` or "
                "`NormMonitor`. A `Population` does not support them (their "
                "numbers would mix the members). Remove that option or callback, or train "
                "the members one by one."
            )

    def _check_member_axis(self) -> None:
        leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(self.members, eqx.is_array))[0]
        for path, leaf in leaves:
            if leaf.ndim == 0 or leaf.shape[0] != self.size:
                raise ValueError(
                    f"The population's array `{jax.tree_util.keystr(path)}` has shape "
                    f"{leaf.shape}, but every array of its members has a leading member axis "
                    f"of size {self.size}: something replaced it with one value for all "
                    "members, e.g. `solstice.tuner.lr_find`, which sets one learning rate for "
                    "the whole experiment and does not support a `Population`. Sweep rates "
                    "with `Population.build(make, lr=[...])` instead; keep the member axis "
                    "when replacing a population's arrays."
                )

    def _member_batches(self, batch: PyTree) -> tuple[PyTree, Any, jax.Array | None]:
        """The batch each member trains on, its vmap axis, and the advanced keys."""
        if self.data == "shared" or self.keys is None:
            return batch, None, self.keys
        leaves = jax.tree.leaves(batch)
        rows = leaves[0].shape[0]
        split = jax.vmap(jr.split)(self.keys)
        keys, draws = split[:, 0], split[:, 1]
        index = jax.vmap(lambda k: jr.randint(k, (rows,), 0, rows))(draws)
        return jax.tree.map(lambda x: x[index], batch), 0, keys

    def train_step(self, batch: PyTree) -> tuple["Population", PopulationMetrics]:
        """Every active member's `train_step`, vmapped; stopped members keep their arrays."""
        self._check_optimizers()
        self._check_member_axis()
        batches, axis, keys = self._member_batches(batch)
        new, metrics = eqx.filter_vmap(
            lambda member, b: member.train_step(b), in_axes=(eqx.if_array(0), axis)
        )(self.members, batches)
        new_dyn, new_static = eqx.partition(new, eqx.is_array)
        kept = _keep(self.active, new_dyn, eqx.filter(self.members, eqx.is_array))
        population = eqx.tree_at(
            lambda p: (p.members, p.keys),
            self,
            (eqx.combine(kept, new_static), keys),
            is_leaf=lambda x: x is None,
        )
        return population, PopulationMetrics(metrics, self.member_metrics)

    def eval_step(self, batch: PyTree) -> PopulationMetrics:
        """Every member's `eval_step` on the batch, vmapped (stopped members included)."""
        metrics = eqx.filter_vmap(lambda member: member.eval_step(batch))(self.members)
        return PopulationMetrics(metrics, self.member_metrics)

    def predict_step(self, batch: PyTree) -> PyTree:
        """Every member's predictions, each leaf shaped `(batch, size, ...)`: member `i`'s
        are `outputs[:, i]`."""
        outputs = eqx.filter_vmap(lambda member: member.predict_step(batch))(self.members)
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outputs)

    def validate_batch(self, batch: PyTree) -> None:
        """The members' `validate_batch` (with their shared non-array configuration)."""
        type(self.members).validate_batch(self.members, batch)

    def on_fit_start(self, trainer: "TrainerView") -> None:
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"`Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches})` "
                "cannot train a `Population` (the accumulation would mix the members' "
                "optimizer calls). Use `accumulate_grad_batches=1`, or accumulate inside "
                "each member's optimizer with `optax.MultiSteps`."
            )
