import functools
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solstice

sklearn_metrics = pytest.importorskip("sklearn.metrics")

NAMES = (
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def _sklearn(y_true, y_pred, num_classes):
    """scikit-learn's values for the metrics `ClassificationMetrics.compute` returns."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning, "y_pred contains classes..."
        out = {
            "accuracy": sklearn_metrics.accuracy_score(y_true, y_pred),
            "balanced_accuracy": sklearn_metrics.balanced_accuracy_score(y_true, y_pred),
            "confusion_matrix": sklearn_metrics.confusion_matrix(
                y_true, y_pred, labels=np.arange(num_classes)
            ),
        }
        for average in ("macro", "weighted"):
            for name, fn in (
                ("precision", sklearn_metrics.precision_score),
                ("recall", sklearn_metrics.recall_score),
                ("f1", sklearn_metrics.f1_score),
            ):
                out[f"{name}_{average}"] = fn(y_true, y_pred, average=average, zero_division=0)
    return out


def _assert_matches_sklearn(metrics, y_true, y_pred):
    expected = _sklearn(y_true, y_pred, metrics.num_classes)
    computed = metrics.compute()
    np.testing.assert_array_equal(metrics.confusion_matrix, expected["confusion_matrix"])
    for name in NAMES:
        assert computed[name].dtype == jnp.float32
        assert computed[name].shape == ()
        np.testing.assert_allclose(
            computed[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def _random_batch(seed, batch, num_classes, true_classes=None, pred_classes=None):
    """Labels and logits whose argmax falls in `pred_classes`, and that are right ~half the time."""
    rng = np.random.default_rng(seed)
    true_classes = np.arange(num_classes) if true_classes is None else np.asarray(true_classes)
    pred_classes = np.arange(num_classes) if pred_classes is None else np.asarray(pred_classes)
    labels = rng.choice(true_classes, size=batch)
    predictions = rng.choice(pred_classes, size=batch)
    right = rng.random(batch) < 0.5
    predictions = np.where(right & np.isin(labels, pred_classes), labels, predictions)
    logits = rng.normal(size=(batch, num_classes)).astype(np.float32)
    logits[np.arange(batch), predictions] += 10.0
    return labels.astype(np.int32), predictions.astype(np.int32), logits


CLASS_SETS = [
    (None, None),  # every class everywhere (with this many examples)
    ([0, 1, 2, 3], [2, 3, 4, 5]),  # some classes only true, some only predicted, 6, 7 nowhere
    ([1, 4], [1, 4, 6]),  # very few classes
    ([5], [0, 5]),  # one true class
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("true_classes,pred_classes", CLASS_SETS)
def test_matches_sklearn(seed, true_classes, pred_classes):
    labels, predictions, logits = _random_batch(seed, 64, 8, true_classes, pred_classes)
    from_logits = solstice.ClassificationMetrics(labels=labels, logits=logits, num_classes=8)
    from_predictions = solstice.ClassificationMetrics(
        labels=labels, predictions=predictions, num_classes=8
    )
    _assert_matches_sklearn(from_logits, labels, predictions)
    _assert_matches_sklearn(from_predictions, labels, predictions)
    assert from_logits.confusion_matrix.dtype == jnp.int32
    assert int(from_logits.count) == 64


def test_perfect_and_all_wrong():
    labels = np.array([0, 1, 2, 2], np.int32)
    perfect = solstice.ClassificationMetrics(labels=labels, predictions=labels, num_classes=3)
    assert all(float(perfect.compute()[name]) == 1.0 for name in NAMES)
    wrong = solstice.ClassificationMetrics(
        labels=labels, predictions=(labels + 1) % 3, num_classes=3
    )
    assert all(float(wrong.compute()[name]) == 0.0 for name in NAMES)


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_matches_sklearn_on_kept_rows(seed):
    labels, predictions, logits = _random_batch(seed, 48, 6, [0, 1, 2, 3], [1, 2, 3, 4])
    mask = np.random.default_rng(seed + 100).random(48) < 0.6
    for given in (mask, mask.astype(np.int32), mask.astype(np.float32)):
        metrics = solstice.ClassificationMetrics(
            labels=labels, logits=logits, mask=given, num_classes=6
        )
        _assert_matches_sklearn(metrics, labels[mask], predictions[mask])


def test_merge_is_associative_and_matches_sklearn():
    num_classes = 7
    batches = [
        _random_batch(seed, size, num_classes, [0, 1, 2, 3, 5], [0, 2, 3, 4, 5])
        for seed, size in enumerate([5, 17, 1, 30, 9])
    ]
    parts = [
        solstice.ClassificationMetrics(labels=y, logits=lg, num_classes=num_classes)
        for y, _, lg in batches
    ]
    left = functools.reduce(lambda a, b: a.merge(b), parts)
    right = functools.reduce(lambda a, b: b.merge(a), reversed(parts))
    tree = (parts[0].merge(parts[1])).merge(parts[2].merge(parts[3].merge(parts[4])))
    from_empty = solstice.ClassificationMetrics.empty(num_classes)
    for part in parts:
        from_empty = from_empty.merge(part)
    y_true = np.concatenate([y for y, _, _ in batches])
    y_pred = np.concatenate([p for _, p, _ in batches])
    for merged in (left, right, tree, from_empty):
        np.testing.assert_array_equal(merged.confusion_matrix, left.confusion_matrix)
        _assert_matches_sklearn(merged, y_true, y_pred)
        assert isinstance(merged, solstice.ClassificationMetrics)
        assert merged.num_classes == num_classes


def test_inside_jit_scan_and_vmap():
    num_classes = 5
    steps, batch = 4, 16
    data = [
        _random_batch(seed, batch, num_classes, [0, 1, 2, 4], [0, 1, 3, 4]) for seed in range(steps)
    ]
    labels = jnp.asarray(np.stack([y for y, _, _ in data]))
    logits = jnp.asarray(np.stack([lg for _, _, lg in data]))
    mask = jnp.asarray(np.random.default_rng(0).random((steps, batch)) < 0.8)
    y_true = np.asarray(labels)[np.asarray(mask)]
    y_pred = np.stack([p for _, p, _ in data])[np.asarray(mask)]

    @jax.jit
    def scanned(labels, logits, mask):
        def step(carry, xs):
            y, lg, m = xs
            metrics = solstice.ClassificationMetrics(
                labels=y, logits=lg, mask=m, num_classes=num_classes
            )
            return carry.merge(metrics), None

        metrics, _ = jax.lax.scan(
            step, solstice.ClassificationMetrics.empty(num_classes), (labels, logits, mask)
        )
        return metrics, metrics.compute()

    metrics, computed = scanned(labels, logits, mask)
    _assert_matches_sklearn(metrics, y_true, y_pred)
    for name in NAMES:
        assert float(computed[name]) == pytest.approx(float(metrics.compute()[name]), abs=1e-6)

    # `jax.vmap` over the batch axis: one confusion matrix per example, summing to the total.
    per_example = jax.vmap(
        lambda y, lg, m: solstice.ClassificationMetrics(
            labels=y, logits=lg, mask=m, num_classes=num_classes
        )
    )(labels.reshape(-1), logits.reshape(-1, num_classes), mask.reshape(-1))
    assert per_example.confusion_matrix.shape == (steps * batch, num_classes, num_classes)
    np.testing.assert_array_equal(per_example.confusion_matrix.sum(0), metrics.confusion_matrix)


def test_sequence_labels_are_flattened():
    labels, predictions, logits = _random_batch(3, 24, 4)
    metrics = solstice.ClassificationMetrics(
        labels=labels.reshape(4, 6), logits=logits.reshape(4, 6, 4), num_classes=4
    )
    _assert_matches_sklearn(metrics, labels, predictions)


def test_loss_per_example_and_scalar():
    labels = np.array([0, 1, 1, 2], np.int32)
    mask = np.array([True, True, False, True])
    per_example = np.array([1.0, 2.0, np.nan, 6.0], np.float32)  # NaN on the padded row
    a = solstice.ClassificationMetrics(
        labels=labels, predictions=labels, loss=per_example, mask=mask, num_classes=3
    )
    assert float(a.compute()["loss"]) == pytest.approx(3.0)
    # A scalar is the mean over the kept rows: weighted by their number when merging.
    b = solstice.ClassificationMetrics(
        labels=labels[:2], predictions=labels[:2], loss=jnp.float32(10.0), num_classes=3
    )
    assert float(b.compute()["loss"]) == pytest.approx(10.0)
    assert float(a.merge(b).compute()["loss"]) == pytest.approx((1 + 2 + 6 + 2 * 10) / 5)
    # bfloat16 losses are accumulated in float32.
    c = solstice.ClassificationMetrics(
        labels=labels, predictions=labels, loss=jnp.ones(4, jnp.bfloat16), num_classes=3
    )
    assert c.compute()["loss"].dtype == jnp.float32


def test_no_loss_is_nan_and_adds_nothing():
    labels = np.array([0, 1, 2], np.int32)
    without = solstice.ClassificationMetrics(labels=labels, predictions=labels, num_classes=3)
    assert set(without.compute()) == set(NAMES) | {"loss"}
    assert np.isnan(without.compute()["loss"])
    with_loss = solstice.ClassificationMetrics(
        labels=labels, predictions=labels, loss=np.float32(0.5), num_classes=3
    )
    assert float(without.merge(with_loss).compute()["loss"]) == pytest.approx(0.5)
    assert float(with_loss.merge(without).compute()["loss"]) == pytest.approx(0.5)
    # Same pytree structure with and without a loss, so they can share a `lax.scan` carry.
    assert jax.tree.structure(without) == jax.tree.structure(with_loss)


def test_fully_masked_batch_counts_nowhere():
    labels = np.array([0, 1], np.int32)
    padded = solstice.ClassificationMetrics(
        labels=labels,
        predictions=labels,
        loss=jnp.float32(jnp.nan),  # the mean over zero rows
        mask=np.zeros(2, bool),
        num_classes=2,
    )
    assert int(padded.count) == 0
    real = solstice.ClassificationMetrics(
        labels=labels, predictions=labels, loss=jnp.float32(1.0), num_classes=2
    )
    merged = real.merge(padded).compute()
    assert float(merged["loss"]) == 1.0
    assert float(merged["accuracy"]) == 1.0


def test_empty():
    empty = solstice.ClassificationMetrics.empty(4)
    assert empty.confusion_matrix.shape == (4, 4)
    assert int(empty.count) == 0
    computed = empty.compute()
    assert all(float(computed[name]) == 0.0 for name in NAMES)
    assert np.isnan(computed["loss"])


def test_is_a_metrics_and_a_module():
    metrics = solstice.ClassificationMetrics.empty(3)
    assert isinstance(metrics, solstice.Metrics)
    assert isinstance(metrics, eqx.Module)
    leaves = jax.tree.leaves(metrics)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_out_of_range_labels():
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\).*contains 3"):
        solstice.ClassificationMetrics(
            labels=np.array([0, 3], np.int32), predictions=np.array([0, 1], np.int32), num_classes=3
        )
    with pytest.raises(ValueError, match=r"`predictions` must lie in \[0, 3\).*contains -1"):
        solstice.ClassificationMetrics(
            labels=np.array([0, 1], np.int32),
            predictions=np.array([0, -1], np.int32),
            num_classes=3,
        )

    # Under `jit` values cannot be checked: such rows are left out.
    @jax.jit
    def build(labels, predictions):
        return solstice.ClassificationMetrics(labels=labels, predictions=predictions, num_classes=3)

    metrics = build(jnp.array([0, 3, -1, 1]), jnp.array([0, 1, 1, 5]))
    assert int(metrics.count) == 1


def test_shape_and_type_errors():
    labels = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*5 entries.*num_classes=3.*output layer"):
        solstice.ClassificationMetrics(
            labels=labels, logits=np.zeros((4, 5), np.float32), num_classes=3
        )
    with pytest.raises(
        ValueError, match=r"`logits` has shape \(5, 3\).*\(4,\).*expected `labels` of shape \(5,\)"
    ):
        solstice.ClassificationMetrics(
            labels=labels, logits=np.zeros((5, 3), np.float32), num_classes=3
        )
    with pytest.raises(ValueError, match="one-hot"):
        solstice.ClassificationMetrics(
            labels=np.eye(3, dtype=np.int32), logits=np.zeros((3, 3), np.float32), num_classes=3
        )
    with pytest.raises(ValueError, match=r"`predictions` has shape \(3,\).*\(4,\)"):
        solstice.ClassificationMetrics(
            labels=labels, predictions=np.zeros(3, np.int32), num_classes=3
        )
    with pytest.raises(ValueError, match="exactly one of `logits`.*neither"):
        solstice.ClassificationMetrics(labels=labels, num_classes=3)
    with pytest.raises(ValueError, match="exactly one of `logits`.*both"):
        solstice.ClassificationMetrics(
            labels=labels, logits=np.zeros((4, 3), np.float32), predictions=labels, num_classes=3
        )
    with pytest.raises(TypeError, match="`labels` must hold integer.*float32.*astype"):
        solstice.ClassificationMetrics(
            labels=labels.astype(np.float32), logits=np.zeros((4, 3), np.float32), num_classes=3
        )
    with pytest.raises(TypeError, match="`predictions` must hold integer.*`logits=`"):
        solstice.ClassificationMetrics(
            labels=labels, predictions=np.zeros(4, np.float32), num_classes=3
        )
    with pytest.raises(ValueError, match=r"`mask` has shape \(3,\)"):
        solstice.ClassificationMetrics(
            labels=labels, predictions=labels, mask=np.ones(3, bool), num_classes=3
        )
    with pytest.raises(ValueError, match=r"`loss` has shape \(2,\).*scalar.*\(4,\)"):
        solstice.ClassificationMetrics(
            labels=labels, predictions=labels, loss=np.ones(2, np.float32), num_classes=3
        )
    with pytest.raises(TypeError, match="`num_classes` must be a Python int.*3.0"):
        solstice.ClassificationMetrics(labels=labels, predictions=labels, num_classes=3.0)
    with pytest.raises(ValueError, match="`num_classes` must be at least 1"):
        solstice.ClassificationMetrics.empty(0)


def test_shape_errors_raise_at_trace_time():
    @jax.jit
    def build(labels, logits):
        return solstice.ClassificationMetrics(labels=labels, logits=logits, num_classes=10)

    with pytest.raises(ValueError, match="num_classes=10"):
        build(jnp.zeros(8, jnp.int32), jnp.zeros((8, 4)))


def test_merge_errors():
    a = solstice.ClassificationMetrics.empty(3)
    with pytest.raises(ValueError, match="`num_classes=3` and `num_classes=4`"):
        a.merge(solstice.ClassificationMetrics.empty(4))
    with pytest.raises(TypeError, match="another `ClassificationMetrics`.*dict"):
        a.merge({})


def test_batch_sharded_over_devices():
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    labels, predictions, logits = _random_batch(7, 8 * len(devices), 6, [0, 1, 2, 5], [1, 2, 3, 5])
    mask = np.arange(len(labels)) % 5 != 0
    put = functools.partial(jax.device_put, device=sharding)

    @jax.jit
    def build(labels, logits, mask):
        return solstice.ClassificationMetrics(
            labels=labels, logits=logits, mask=mask, num_classes=6
        )

    metrics = build(put(labels), put(logits), put(mask))
    _assert_matches_sklearn(metrics, labels[mask], predictions[mask])
