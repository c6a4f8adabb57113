"""`ClassificationExperiment`: a ready experiment for multi-class classification."""

from collections.abc import Mapping
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import PyTree

from ._classification_metrics import ClassificationMetrics
from ._experiment import Experiment
from ._loss_scaling import scale_loss
from ._optimizer import Optimizer


def _is_none(x: Any) -> bool:
    return x is None


class ClassificationExperiment(Experiment):
    """Trains an Equinox classifier with softmax cross-entropy. Plug in a model and go.

    The model maps *one* example to logits (Equinox's convention); the experiment vmaps it
    over the batch. It is called as `model(x, key=key)`, or, when `state` is given (models
    with `eqx.nn.BatchNorm`, built with `eqx.nn.make_with_state`), as
    `model(x, state, key=key) -> (logits, state)` with batch axis name `"batch"` (so
    `eqx.nn.BatchNorm(channels, axis_name="batch", mode="batch")`; Equinox warns without
    an explicit `mode`). Dropout and
    other randomness get keys split from the experiment's own PRNG key, which advances every
    step, so a run is a function of its seed. Evaluation runs the model in inference mode.

    Batches are dicts (`batch[input_key]`, `batch[label_key]`, optional boolean
    `batch["mask"]`) or `(inputs, labels)` / `(inputs, labels, mask)` tuples. Rows whose mask
    is false count nowhere, so the Trainer pads the short last evaluation batch of dict
    batches (`honours_mask`) instead of compiling a step for it. `train_step`/`eval_step`
    return `ClassificationMetrics`; `predict_step` returns class probabilities.

    **Arguments:**

    - `model`: an Equinox module mapping one input to `num_classes` logits.
    - `optimizer`: a `solstice.Optimizer` built for `model`'s parameters.
    - `num_classes`: number of classes; labels must lie in `[0, num_classes)`.
    - `state`: the `eqx.nn.State` of a stateful model, else `None`.
    - `key`: PRNG key for dropout etc. (default `jax.random.key(0)`).
    - `input_key`, `label_key`: the dict keys of inputs and labels.

    **Example:**

    ```python
    model = eqx.nn.MLP(64, 10, 128, 2, key=jax.random.key(0))
    experiment = solstice.ClassificationExperiment(
        eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), model]),
        solstice.OptaxOptimizer(optax.adam(1e-3), model), num_classes=10)
    ```
    """

    honours_mask: ClassVar[bool] = True

    model: PyTree
    optimizer: Optimizer
    state: eqx.nn.State | None
    key: jax.Array
    num_classes: int = eqx.field(static=True)
    input_key: str = eqx.field(static=True)
    label_key: str = eqx.field(static=True)

    def __init__(
        self,
        model: PyTree,
        optimizer: Optimizer,
        num_classes: int,
        *,
        state: eqx.nn.State | None = None,
        key: jax.Array | None = None,
        input_key: str = "image",
        label_key: str = "label",
    ):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` must be a `solstice.Optimizer`, got `{type(optimizer).__name__}`. "
                "Wrap optax transformations: `solstice.OptaxOptimizer(optax.adam(1e-3), model)`."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}.")
        self.model = model
        self.optimizer = optimizer
        self.state = state
        self.key = jr.key(0) if key is None else key
        self.num_classes = num_classes
        self.input_key = input_key
        self.label_key = label_key

    # ---- batches
    def _unpack(self, batch: PyTree) -> tuple[Any, Any, Any]:
        if isinstance(batch, Mapping):
            missing = [k for k in (self.input_key, self.label_key) if k not in batch]
            if missing:
                raise ValueError(
                    f"The batch has keys {sorted(batch)}, but `ClassificationExperiment` "
                    f"looks for {missing}. Pass `input_key=`/`label_key=` to match your "
                    "datamodule's keys."
                )
            return batch[self.input_key], batch[self.label_key], batch.get("mask")
        if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
            return batch[0], batch[1], batch[2] if len(batch) == 3 else None
        raise TypeError(
            f"`ClassificationExperiment` expects dict batches with keys "
            f"`{self.input_key}`/`{self.label_key}` or `(inputs, labels)` tuples, got "
            f"`{type(batch).__name__}`."
        )

    def validate_batch(self, batch: PyTree) -> None:
        """Check labels on the host: integers in `[0, num_classes)`."""
        # This runs on the host for every batch, beside the training thread: kept to a few
        # microseconds. `type(self)._unpack`: reading a method off an eqx.Module instance
        # builds a bound-method module (~150 us).
        labels = batch.get(self.label_key) if type(batch) is dict else None
        if labels is None:
            _, labels, _ = type(self)._unpack(self, batch)
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise TypeError(
                f"Labels must be integers, got dtype {labels.dtype}. Convert them with "
                "`labels.astype(np.int32)`."
            )
        if labels.ndim != 1:
            raise ValueError(
                f"Labels must have shape (batch,), got {labels.shape}. Pass class indices, "
                "not one-hot vectors (use `labels.argmax(-1)`)."
            )
        # One reduction: seen as unsigned, a negative label is larger than any class.
        if labels.size and int(labels.view(f"u{labels.itemsize}").max()) >= self.num_classes:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0:
                raise ValueError(
                    f"Found label {lo}, outside [0, {self.num_classes}): labels are class "
                    "indices and cannot be negative. Fix the labels (e.g. drop examples "
                    "marked -1 from the split)."
                )
            raise ValueError(
                f"Found label {hi}, outside [0, {self.num_classes}) for "
                f"`num_classes={self.num_classes}`. Fix the labels or set `num_classes` "
                f"to at least {hi + 1}."
            )

    # ---- model calls
    def _logits(self, model, state, x, key, inference: bool):
        batch = x.shape[0]
        keys = None if key is None else jr.split(key, batch)
        if inference:
            model = eqx.nn.inference_mode(model)
        if state is None:
            if keys is None:
                logits = jax.vmap(lambda xi: model(xi))(x)
            else:
                logits = jax.vmap(lambda xi, k: model(xi, key=k))(x, keys)
            new_state = None
        else:

            def one(xi, st, k):
                return model(xi, st) if k is None else model(xi, st, key=k)

            logits, new_state = jax.vmap(
                one,
                axis_name="batch",
                in_axes=(0, None, 0 if keys is not None else None),
                out_axes=(0, None),
            )(x, state, keys)
        # The softmax and loss in float32 at least, whatever the model computes in (the
        # precision policies run it in bfloat16 or float16).
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"The model produced logits of shape {logits.shape[1:]} per example, but "
                f"`num_classes={self.num_classes}` needs ({self.num_classes},). Make the "
                f"model's final layer output {self.num_classes} values (or fix `num_classes`)."
            )
        return logits, new_state

    def _metrics(self, logits, labels, losses, mask) -> ClassificationMetrics:
        return ClassificationMetrics(
            logits=logits, labels=labels, loss=losses, num_classes=self.num_classes, mask=mask
        )

    # ---- steps
    def train_step(self, batch: PyTree) -> tuple["ClassificationExperiment", ClassificationMetrics]:
        x, labels, mask = self._unpack(batch)
        key, step_key = jr.split(self.key)
        weights = None if mask is None else mask.astype(jnp.float32)

        def loss_fn(model):
            logits, state = self._logits(model, self.state, x, step_key, inference=False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            if weights is None:
                loss = jnp.mean(losses)
            else:
                loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            return scale_loss(loss), (logits, losses, state)  # scaled under 16-mixed only

        (_, (logits, losses, state)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            self.model
        )
        updates, optimizer = self.optimizer(grads, eqx.filter(self.model, eqx.is_array))
        model = eqx.apply_updates(self.model, updates)
        new = eqx.tree_at(
            lambda e: (e.model, e.optimizer, e.state, e.key),
            self,
            (model, optimizer, state, key),
            is_leaf=_is_none,
        )
        return new, self._metrics(jax.lax.stop_gradient(logits), labels, losses, mask)

    def eval_step(self, batch: PyTree) -> ClassificationMetrics:
        x, labels, mask = self._unpack(batch)
        logits, _ = self._logits(self.model, self.state, x, None, inference=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return self._metrics(logits, labels, losses, mask)

    def predict_step(self, batch: PyTree) -> jax.Array:
        """Class probabilities, shape `(batch, num_classes)`."""
        if isinstance(batch, Mapping):
            x = batch[self.input_key]
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            x = batch
        logits, _ = self._logits(self.model, self.state, x, None, inference=True)
        return jax.nn.softmax(logits, axis=-1)
