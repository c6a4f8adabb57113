"""The host loader's fast paths yield exactly (bitwise) what the general algorithm yields.

`BatchLoader` slices the epoch's order once and gathers each leaf with a bound method;
`PixelDecode` casts then scales in place. The reference here is the straightforward
algorithm they replace: `EpochOrder.local_indices(b)`, `np.take(leaf, idx, axis=0)` per
leaf, then the transform (`np.multiply(x, scale, dtype=float32)` for decoding). Every seed,
epoch, start, process share, short-last-batch case and leaf layout must give the same keys,
dtypes, shapes and bytes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solstice.datamodules import MNIST, BatchLoader, PixelDecode, batch_size_of, pad_batch
from solstice.datamodules._cifar_files import read_cifar_binary
from solstice.datamodules._idx import parse_idx
from solstice.datamodules._order import EpochOrder


def reference_batches(arrays, batch_size, *, start=0, transform=None, **kw):
    """The general path: one `local_indices` call and `np.take` per leaf, per batch."""
    order = EpochOrder(jax.tree.leaves(arrays)[0].shape[0], batch_size, **kw)
    for b in range(start, len(order)):
        idx = order.local_indices(b)
        if type(arrays) is dict and jax.tree_util.all_leaves(arrays.values()):
            batch = {k: np.take(a, idx, axis=0) for k, a in arrays.items()}
        else:
            batch = jax.tree.map(lambda a, idx=idx: np.take(a, idx, axis=0), arrays)
        if transform is not None:
            batch = transform(batch)
        yield batch


def reference_pad(batch, size):
    """`pad_batch` through pytree functions only: validate, pad every leaf, add the mask."""
    n = batch_size_of(batch)
    out = dict(batch)
    mask = np.asarray(out.pop("mask", np.ones((n,), dtype=bool)), dtype=bool)

    def pad(x):
        x = np.asarray(x)
        return x if n == size else np.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1))

    out = jax.tree.map(pad, out)
    out["mask"] = pad(mask)
    return out


def reference_decode(mean=(0.0,), std=(1.0,)):
    """`PixelDecode`'s formula as a single mixed-type ufunc call per operation."""
    shape = (1, len(mean), 1, 1)
    offset = (255.0 * np.asarray(mean, np.float64)).astype(np.float32).reshape(shape)
    scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32).reshape(shape)

    def decode(batch):
        out = dict(batch)
        x = batch["image"]
        if np.any(offset):
            y = np.subtract(x, offset, dtype=np.float32)
            out["image"] = np.multiply(y, scale, out=y)
        else:
            out["image"] = np.multiply(x, scale, dtype=np.float32)
        return out

    return decode


def assert_same_batch(got, want):
    assert type(got) is type(want)
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def
    if isinstance(got, dict):
        assert list(got) == list(want)  # same keys in the same order
    for g, w in zip(got_leaves, want_leaves):
        assert isinstance(g, np.ndarray)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.flags.c_contiguous
        assert g.tobytes() == w.tobytes()


def assert_same_epoch(loader, reference):
    got, want = list(loader), list(reference)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same_batch(g, w)


def _arrays(n=53, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8),
        "label": rng.integers(0, 10, n).astype(np.int32),
        "weight": rng.normal(size=(n, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_loader_matches_the_general_path(process_count, drop_last, shuffle):
    arrays = _arrays()
    for seed in (0, 7):
        for epoch in (0, 1, 5):
            order_kw = dict(shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
            n_batches = len(EpochOrder(53, 8, **order_kw))
            for start in sorted({0, 1, n_batches - 1, n_batches}):
                for p in range(process_count):
                    kw = dict(order_kw, process_index=p, process_count=process_count)
                    loader = BatchLoader(arrays, 8, **kw)
                    assert_same_epoch(
                        loader.iter_from(start),
                        reference_batches(arrays, 8, start=start, **kw),
                    )


@pytest.mark.parametrize("drop_last", [True, False])
def test_batch_loader_with_decode_matches_the_general_path(drop_last):
    arrays = _arrays(n=70)
    for process_count in (1, 2):
        for p in range(process_count):
            kw = dict(
                shuffle=True,
                seed=3,
                epoch=2,
                drop_last=drop_last,
                process_index=p,
                process_count=process_count,
            )
            loader = BatchLoader(arrays, 16, transform=PixelDecode(), **kw)
            assert_same_epoch(
                loader.iter_from(1),
                reference_batches(arrays, 16, start=1, transform=reference_decode(), **kw),
            )


class _Sub(np.ndarray):
    pass


def test_non_dict_and_strided_leaves_match_the_general_path():
    rng = np.random.default_rng(1)
    records = rng.integers(0, 256, (30, 1 + 12), dtype=np.uint8)
    strided = records[:, 1:].reshape(30, 3, 2, 2)  # a view with a row stride, as CIFAR's
    assert not strided.flags.c_contiguous
    labels = records[:, 0].astype(np.int32)
    subclass = np.arange(30.0).view(_Sub)  # not exactly an ndarray: gathered by `np.take`
    for arrays in (
        (strided, labels),
        {"image": strided, "label": labels},
        {"x": {"a": labels, "b": strided}, "y": labels},
        [subclass, labels],
        {"s": subclass, "label": labels},
    ):
        for drop_last in (True, False):
            kw = dict(shuffle=True, seed=2, epoch=4, drop_last=drop_last)
            assert_same_epoch(BatchLoader(arrays, 7, **kw), reference_batches(arrays, 7, **kw))


def test_pad_batch_matches_the_pytree_path():
    rng = np.random.default_rng(4)
    full = {"z": rng.normal(size=(4, 2)), "a": np.arange(4), "mask": np.array([1, 1, 0, 1])}
    for batch in (
        full,
        {"z": full["z"], "a": full["a"]},
        {"z": full["z"][:3], "a": full["a"][:3]},  # the last, partial batch
        {"z": full["z"][:0], "a": full["a"][:0]},  # a process's empty share
        {"x": {"b": full["z"], "a": full["a"]}, "c": full["a"]},  # nested
        {"x": full["z"], "y": [full["a"], full["a"]]},  # a list of leaves
    ):
        assert_same_batch(pad_batch(batch, 4), reference_pad(batch, 4))
    with pytest.raises(ValueError, match="disagree"):
        pad_batch({"x": np.zeros((3, 1)), "y": np.zeros((2,))}, 4)
    with pytest.raises(ValueError, match="scalar"):
        pad_batch({"x": np.zeros((3, 1)), "y": np.float32(0)}, 4)
    with pytest.raises(ValueError, match="down to"):
        pad_batch({"x": np.zeros((5, 1))}, 4)


def test_batches_are_fresh_arrays():
    arrays = _arrays()
    loader = BatchLoader(arrays, 8, shuffle=True, seed=0, epoch=0, drop_last=True)
    batches = list(loader)
    for batch in batches:
        for k, leaf in batch.items():
            assert leaf.flags.writeable and leaf.flags.owndata
            assert not np.shares_memory(leaf, arrays[k])
    batches[0]["image"][:] = 0  # changing a batch changes neither the data nor another batch
    assert_same_epoch(
        BatchLoader(arrays, 8, shuffle=True, seed=0, epoch=0, drop_last=True).iter_from(1),
        reference_batches(arrays, 8, start=1, shuffle=True, seed=0, epoch=0, drop_last=True),
    )


@pytest.mark.parametrize(
    "mean, std",
    [((0.0,), (1.0,)), ((0.1307,), (0.3081,)), ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))],
)
def test_pixel_decode_host_path_is_bitwise_the_reference_and_the_device(mean, std):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (9, len(mean), 5, 5), dtype=np.uint8)
    x[0] = np.arange(256, dtype=np.uint8)[: x[0].size].reshape(x[0].shape)
    x[1] = 255
    batch = {"image": x, "label": np.arange(9, dtype=np.int32)}
    decode = PixelDecode(mean, std)
    got = decode(batch)
    assert_same_batch(got, reference_decode(mean, std)(batch))
    device = jax.jit(decode)({k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_array_equal(np.asarray(device["image"]), got["image"])
    assert np.asarray(device["image"]).tobytes() == got["image"].tobytes()
    assert got["image"] is not x and got["label"] is batch["label"]


def test_pixel_decode_one_channel_stats_on_three_channels():
    x = np.random.default_rng(2).integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    got = PixelDecode((0.5,), (0.25,))({"image": x})
    want = (x.astype(np.float32) - np.float32(127.5)) * np.float32(1 / (255 * 0.25))
    assert got["image"].tobytes() == want.tobytes()


def test_parsed_idx_and_cifar_images_own_contiguous_memory(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.asarray(data.shape, ">u4").tobytes() + data.tobytes()
    parsed = parse_idx(raw, "x.idx")
    np.testing.assert_array_equal(parsed, data)
    assert parsed.flags.owndata and parsed.flags.writeable and parsed.flags.c_contiguous
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(np.arange(3 * 3073, dtype=np.uint32).astype(np.uint8).tobytes())
    images, labels = read_cifar_binary(path)
    assert images.shape == (3, 3, 32, 32) and images.flags.c_contiguous
    assert labels.tolist() == [0, 3073 % 256, (2 * 3073) % 256]


def test_mnist_training_batches_are_the_decoded_rows_of_the_epoch_order(tmp_path):
    from test_dataset_formats import write_mnist_files

    write_mnist_files(tmp_path, folder="MNIST", gz=False, n_train=100, n_test=20)
    dm = MNIST(tmp_path, batch_size=16, val_fraction=0.0, seed=5, download=False)
    dm.setup("fit")
    dm.set_epoch(3)
    split = dm.splits["train"]
    perm = np.random.default_rng([5, 3]).permutation(100)
    batches = list(dm.train_dataloader())
    assert len(batches) == 100 // 16
    for b, batch in enumerate(batches):
        idx = perm[b * 16 : (b + 1) * 16]
        want = split["image"][idx].astype(np.float32) * np.float32(1 / 255)
        assert list(batch) == ["image", "label"]
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (16, 1, 28, 28)
        assert batch["image"].tobytes() == want.tobytes()
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], split["label"][idx])


def _leaves_with_layouts(n):
    """A dict of leaves: uint8 images, int32 labels, a strided (non-contiguous) view."""
    rng = np.random.default_rng(7)
    wide = rng.normal(size=(n, 6)).astype(np.float32)
    return {
        "image": rng.integers(0, 256, size=(n, 3, 4, 4), dtype=np.uint8),
        "label": rng.integers(0, 10, size=(n,)).astype(np.int32),
        "strided": wide[:, ::2],
    }


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("max_batches", [1, 3, 16])
@pytest.mark.parametrize("start,stop", [(0, None), (2, None), (1, 6), (5, 5)])
def test_iter_stacked_holds_the_batches_of_iter_from(process_count, max_batches, start, stop):
    arrays = _leaves_with_layouts(101)
    for p in range(process_count):
        kw = dict(shuffle=True, seed=4, epoch=1, drop_last=True)
        kw.update(process_index=p, process_count=process_count)
        loader = BatchLoader(arrays, 8, **kw)
        expected = list(loader.iter_from(start))[: None if stop is None else stop - start]
        got, sizes = [], set()
        for n, stacked in loader.iter_stacked(
            start, stop, max_batches=max_batches, max_bytes=1 << 20
        ):
            assert 1 <= n <= max_batches
            sizes.add(stacked["image"].shape[0])
            for i in range(stacked["image"].shape[0]):  # padding repeats the last batch
                batch = {k: x[i] for k, x in stacked.items()}
                if i < n:
                    got.append(batch)
                else:
                    assert all(
                        np.array_equal(a, b) for a, b in zip(batch.values(), got[-1].values())
                    )
        assert sizes <= {max_batches}  # every stack has the same shape (one upload shape)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                np.testing.assert_array_equal(a[k], b[k])


def test_iter_stacked_sizes_stacks_by_bytes_and_fills_fresh_buffers():
    arrays = {
        "x": np.arange(64 * 10, dtype=np.float32).reshape(64, 10),
        "y": np.zeros(64, np.int32),
    }
    loader = BatchLoader(arrays, 4, shuffle=False, drop_last=True)
    made = []

    def empty(shape, dtype):
        made.append(shape)
        return np.full(shape, -1, dtype)  # never left over: every row is written

    # a batch is 4 * (40 + 4) = 176 bytes: 500 bytes hold 2 batches
    items = list(loader.iter_stacked(0, max_batches=16, max_bytes=500, empty=empty))
    assert [n for n, _ in items] == [2] * 8
    assert made == [(2, 4, 10), (2, 4)] * 8
    assert not any((stacked["x"] == -1).any() for _, stacked in items)
    np.testing.assert_array_equal(items[0][1]["x"][1], arrays["x"][4:8])


def test_iter_stacked_refuses_loaders_it_cannot_serve():
    arrays = {"image": np.zeros((10, 2), np.float32), "label": np.zeros(10, np.int32)}
    evaluation = BatchLoader(arrays, 4, drop_last=False)
    transformed = BatchLoader(arrays, 4, drop_last=True, transform=lambda b: b)
    for loader in (evaluation, transformed):
        assert not loader.stackable
        # the `Loader` protocol: a capability a loader lacks answers None
        assert loader.iter_stacked(0, max_batches=4, max_bytes=1 << 20) is None
    assert BatchLoader(arrays, 4, drop_last=True).stackable
