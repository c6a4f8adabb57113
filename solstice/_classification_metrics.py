"""`ClassificationMetrics`: a confusion matrix on the device, and the metrics computed from it."""

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._metrics import Metrics


def _safe_divide(numerator: Array, denominator: Array) -> Array:
    """`numerator / denominator`, and 0 where `denominator == 0` (scikit-learn's `zero_division=0`)."""
    safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
    return jnp.where(denominator == 0, jnp.zeros_like(numerator), numerator / safe)


def _masked_mean(values: Array, where: Array) -> Array:
    """Mean of `values` over the entries where `where` is true; 0 if there are none."""
    total = jnp.sum(jnp.where(where, values, jnp.zeros_like(values)))
    return _safe_divide(total, jnp.sum(where).astype(values.dtype))


def _check_integer(name: str, x: Array, hint: str = "") -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must hold integer class indices, but has dtype {x.dtype}.{hint} "
            f"Cast it with `{name}.astype(jnp.int32)` if it holds whole numbers."
        )


def _check_range(name: str, x: Array, num_classes: int) -> None:
    """Raise if a concrete (not traced) `x` holds a value outside `[0, num_classes)`."""
    if isinstance(x, jax.core.Tracer) or x.size == 0 or not x.is_fully_addressable:
        return  # traced (under `jit`), or spread over several hosts: cannot look at the values
    values = np.asarray(x)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"`{name}` must lie in [0, {num_classes}) for `num_classes={num_classes}`, but "
            f"contains {bad[0]}. Check `num_classes` or remap the labels to 0..{num_classes - 1}."
        )


@functools.partial(jax.jit, static_argnames="num_classes")
def _accumulate(labels, logits, predictions, loss, mask, *, num_classes):
    """The confusion matrix, loss sum and loss count of one batch (already validated)."""
    if logits is not None:
        predictions = jnp.argmax(logits, axis=-1)
    labels = labels.reshape(-1)
    predictions = predictions.reshape(-1)
    if mask is None:
        keep = jnp.ones(labels.shape, bool)
    else:
        keep = (mask if mask.dtype == jnp.bool_ else mask != 0).reshape(-1)
    # Out-of-range values cannot be reported under `jit`: leave such rows out.
    valid = keep & (labels >= 0) & (labels < num_classes)
    valid = valid & (predictions >= 0) & (predictions < num_classes)
    rows = jnp.where(valid, labels, jnp.zeros_like(labels))
    cols = jnp.where(valid, predictions, jnp.zeros_like(predictions))
    confusion = jnp.zeros((num_classes, num_classes), jnp.int32)
    confusion = confusion.at[rows, cols].add(valid.astype(jnp.int32))

    num_kept = jnp.sum(keep.astype(jnp.int32))
    zero = jnp.zeros((), jnp.float32)
    if loss is None:
        return confusion, zero, jnp.zeros((), jnp.int32)
    loss = loss.astype(jnp.float32)
    if loss.ndim == 0:
        # The mean over the kept rows; over no rows it adds nothing (even if it is NaN).
        loss_sum = jnp.where(num_kept > 0, loss * num_kept.astype(jnp.float32), zero)
    else:
        # `where`, not a product: a NaN loss on a padded row must not leak in.
        loss = loss.reshape(-1)
        loss_sum = jnp.sum(jnp.where(keep, loss, jnp.zeros_like(loss)))
    return confusion, loss_sum, num_kept


@jax.jit
def _compute(confusion, loss_sum, loss_count):
    cm = confusion.astype(jnp.float32)
    true_positives = jnp.diagonal(cm)
    support = jnp.sum(cm, axis=1)  # examples of each true class
    predicted = jnp.sum(cm, axis=0)  # examples predicted as each class
    total = jnp.sum(support)

    precision = _safe_divide(true_positives, predicted)
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * true_positives, support + predicted)
    present = (support + predicted) > 0  # scikit-learn's `unique_labels(y_true, y_pred)`

    def weighted(values):
        return _safe_divide(jnp.sum(values * support), total)

    return {
        "accuracy": _safe_divide(jnp.sum(true_positives), total),
        "balanced_accuracy": _masked_mean(recall, support > 0),  # classes among the labels
        "precision_macro": _masked_mean(precision, present),
        "recall_macro": _masked_mean(recall, present),
        "f1_macro": _masked_mean(f1, present),
        "precision_weighted": weighted(precision),
        "recall_weighted": weighted(recall),
        "f1_weighted": weighted(f1),
        "loss": loss_sum / loss_count.astype(jnp.float32),
    }


class ClassificationMetrics(Metrics):
    """Multi-class classification metrics, computed from a confusion matrix kept on the device.

    It counts a confusion matrix (rows: true class, columns: predicted class) and the loss;
    `compute` turns them into accuracy, balanced accuracy, and macro- and support-weighted
    precision, recall and F1. Every value matches scikit-learn's function of the same name with `zero_division=0`,
    including when some classes never occur: macro averages run over the classes that occur
    among the labels or the predictions, `balanced_accuracy` over the classes that occur among
    the labels, and weighted averages weight each class by its number of true examples.

    Rows where `mask` is false count nowhere (neither in the confusion matrix nor in the
    loss), so padded evaluation batches give exact results. The object is an immutable
    `equinox.Module` of arrays: build it inside a jitted, vmapped or scanned step and `merge`
    the results; `merge` is associative.

    **Arguments:**

    - `labels`: integer true classes, shape `(batch,)`.
    - `num_classes`: the number of classes `C` (a static Python `int`).
    - `logits`: the model's scores, shape `(batch, C)`; the predicted class is the argmax.
    - `predictions`: integer predicted classes, shape `(batch,)`. Give exactly one of
        `logits` and `predictions`.
    - `loss`: optional. Either a scalar, taken to be the mean loss over the unmasked rows of
        the batch, or a per-example loss of shape `(batch,)`.
    - `mask`: optional boolean (or 0/1) array of shape `(batch,)`; false marks padding.

    More generally `labels` may have any shape `S`, with `logits` of shape `S + (C,)` and
    `predictions`, `mask` and a per-example `loss` of shape `S` (e.g. `(batch, sequence)`
    for per-token classification, or `()` inside `jax.vmap`).

    Labels or predictions outside `[0, C)` raise a `ValueError` when the arrays are concrete;
    inside `jax.jit` (where values cannot be checked without stopping the device) such rows
    are left out of the confusion matrix. Check label ranges in your data pipeline.

    **Loss:** `compute()` always returns a `"loss"` entry, so the result has the same keys
    whatever was passed: the mean over all examples that came with a loss, or NaN if no batch
    had one. Batches without a loss add nothing to it when merged with batches that had one.

    **Example:**

    ```python
    @eqx.filter_jit
    def eval_step(model, x, y, mask):
        logits = jax.vmap(model)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return solstice.ClassificationMetrics(
            labels=y, logits=logits, loss=loss, mask=mask, num_classes=10
        )

    metrics = solstice.ClassificationMetrics.empty(num_classes=10)
    for x, y, mask in batches:
        metrics = metrics.merge(eval_step(model, x, y, mask))
    print(metrics.compute()["f1_macro"], metrics.confusion_matrix)
    ```
    """

    confusion_matrix: Int[Array, "num_classes num_classes"]  # noqa: F722
    loss_sum: Float[Array, ""]  # noqa: F722
    loss_count: Int[Array, ""]  # noqa: F722
    num_classes: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        labels: ArrayLike,
        num_classes: int,
        logits: ArrayLike | None = None,
        predictions: ArrayLike | None = None,
        loss: ArrayLike | None = None,
        mask: ArrayLike | None = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise TypeError(
                f"`num_classes` must be a Python int, but got {num_classes!r} of type "
                f"{type(num_classes).__name__}. Pass the number of classes, e.g. `num_classes=10`."
            )
        num_classes = int(num_classes)
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be at least 1, but got {num_classes}.")
        if (logits is None) == (predictions is None):
            raise ValueError(
                "Pass exactly one of `logits` (scores of shape (batch, num_classes)) and "
                "`predictions` (integer classes of shape (batch,)), but got "
                f"{'both' if logits is not None else 'neither'}."
            )
        labels = jnp.asarray(labels)
        if logits is not None:
            logits = jnp.asarray(logits)
            if logits.ndim == 0 or logits.shape[-1] != num_classes:
                raise ValueError(
                    f"`logits` has shape {logits.shape}, so its last axis has "
                    f"{logits.shape[-1] if logits.ndim else 'no'} entries, but "
                    f"`num_classes={num_classes}`. The last axis must hold one score per class: "
                    "pass the `num_classes` your model was built with, or check the model's "
                    "output layer."
                )
            if logits.shape[:-1] != labels.shape:
                hint = (
                    " If `labels` is one-hot, pass `labels=jnp.argmax(labels, axis=-1)`."
                    if labels.shape == logits.shape
                    else ""
                )
                raise ValueError(
                    f"`logits` has shape {logits.shape} but `labels` has shape {labels.shape}; "
                    f"expected `labels` of shape {logits.shape[:-1]} (one label per row of "
                    f"`logits`).{hint} Check that both come from the same batch."
                )
            _check_integer("labels", labels)
        else:
            predictions = jnp.asarray(predictions)
            if predictions.shape != labels.shape:
                raise ValueError(
                    f"`predictions` has shape {predictions.shape} but `labels` has shape "
                    f"{labels.shape}; they must match (one predicted class per label). If "
                    "`predictions` holds scores, pass them as `logits=` instead."
                )
            _check_integer("labels", labels)
            _check_integer("predictions", predictions, " Pass scores as `logits=` instead.")
            _check_range("predictions", predictions, num_classes)
        _check_range("labels", labels, num_classes)
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != labels.shape:
                raise ValueError(
                    f"`mask` has shape {mask.shape} but `labels` has shape {labels.shape}; "
                    "expected one entry per label (true for real rows, false for padding)."
                )
        if loss is not None:
            loss = jnp.asarray(loss)
            if loss.ndim != 0 and loss.shape != labels.shape:
                raise ValueError(
                    f"`loss` has shape {loss.shape}, but must be a scalar (the mean over the "
                    f"batch) or have the shape of `labels`, {labels.shape} (one loss per "
                    "example). Pass `loss=jnp.mean(per_example_loss)` or the unreduced "
                    "per-example loss."
                )
        self.confusion_matrix, self.loss_sum, self.loss_count = _accumulate(
            labels, logits, predictions, loss, mask, num_classes=num_classes
        )
        self.num_classes = num_classes

    def merge(self, other: Metrics) -> "ClassificationMetrics":
        """Return the metrics of both sets of examples together (sums every count)."""
        if not isinstance(other, ClassificationMetrics):
            raise TypeError(
                "`ClassificationMetrics.merge` expects another `ClassificationMetrics`, but got "
                f"{type(other).__name__}."
            )
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"Cannot merge `ClassificationMetrics` with `num_classes={self.num_classes}` and "
                f"`num_classes={other.num_classes}`; build both with the same `num_classes`."
            )
        return eqx.tree_at(
            lambda m: (m.confusion_matrix, m.loss_sum, m.loss_count),
            self,
            (
                self.confusion_matrix + other.confusion_matrix,
                self.loss_sum + other.loss_sum,
                self.loss_count + other.loss_count,
            ),
        )

    def compute(self) -> dict[str, Any]:
        """Compute the metrics from the accumulated confusion matrix and loss.

        **Returns:**

        A `dict` of float32 scalar arrays: `accuracy`, `balanced_accuracy`,
        `precision_macro`, `recall_macro`, `f1_macro`, `precision_weighted`,
        `recall_weighted`, `f1_weighted` (each 0 when nothing was counted) and `loss`
        (NaN when no example came with a loss).
        """
        return _compute(self.confusion_matrix, self.loss_sum, self.loss_count)

    @property
    def count(self) -> Int[Array, ""]:  # noqa: F722
        """The number of examples counted in the confusion matrix."""
        return jnp.sum(self.confusion_matrix)

    @classmethod
    def empty(cls, num_classes: int) -> "ClassificationMetrics":
        """The metrics of no examples: the identity of `merge`.

        **Arguments:**

        - `num_classes`: the number of classes.

        **Returns:**

        A `ClassificationMetrics` with an all-zero confusion matrix and no loss.
        """
        none = jnp.zeros((0,), jnp.int32)
        return cls(labels=none, predictions=none, num_classes=num_classes)
