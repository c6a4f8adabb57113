"""Data on the device: the gather loader, pixel decoding, and keyed augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_dataset_formats import write_cifar_binary

from solstice.datamodules import (
    CIFAR10,
    ArrayDataModule,
    BatchLoader,
    DeviceBatchLoader,
    PixelDecode,
    RandomCropFlip,
    StepKeyed,
)
from solstice.datamodules._device import put_replicated
from solstice.datamodules._order import EpochOrder

pytestmark = pytest.mark.usefixtures("strict_promotion")


def _data(n=50):
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8),
        "label": rng.integers(0, 10, (n,)).astype(np.int32),
    }


def test_device_loader_makes_no_host_to_device_transfer_per_step():
    data = _data()
    dm = ArrayDataModule(
        train=data, val=data, batch_size=8, on_device=True, transform=PixelDecode()
    )
    for split in ("train", "val"):
        batches = iter(getattr(dm, f"{split}_dataloader")())
        next(batches)  # the epoch's order is uploaded here
        with jax.transfer_guard_host_to_device("disallow"):
            rest = list(batches)
        assert len(rest) == len(getattr(dm, f"{split}_dataloader")()) - 1


def test_device_loader_uploads_the_split_once():
    data = _data()
    dm = ArrayDataModule(train=data, batch_size=8, on_device=True)
    first = dm.train_dataloader().arrays
    dm.set_epoch(1)
    assert dm.train_dataloader().arrays is first
    dm.splits["train"] = _data(40)  # new data, new upload
    assert dm.train_dataloader().arrays is not first


def test_device_loader_on_a_smaller_mesh():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    data = _data()
    dm = ArrayDataModule(train=data, val=data, batch_size=6, on_device=True, mesh=mesh)
    host = ArrayDataModule(train=data, val=data, batch_size=6)
    for x, y in zip(dm.val_dataloader(), host.val_dataloader(), strict=True):
        assert x["image"].sharding == NamedSharding(mesh, PartitionSpec("batch"))
        np.testing.assert_array_equal(np.asarray(x["image"]), y["image"])


def test_device_mode_argument_errors():
    data = _data()
    with pytest.raises(ValueError, match="Batch size 6 .* 4 devices .* multiple of 4"):
        ArrayDataModule(train=data, batch_size=6, on_device=True).train_dataloader()
    with pytest.raises(ValueError, match="Batch size 10 .* multiple of 4"):
        ArrayDataModule(
            train=data, val=data, batch_size=8, eval_batch_size=10, on_device=True
        ).val_dataloader()
    two = Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    with pytest.raises(ValueError, match="Batch size 5 .* multiple of 2"):
        ArrayDataModule(train=data, batch_size=5, on_device=True, mesh=two)
    with pytest.raises(ValueError, match=r"axes \('x',\) but no data axis"):
        ArrayDataModule(
            train=data, batch_size=8, on_device=True, mesh=Mesh(np.asarray(jax.devices()), ("x",))
        )
    with pytest.raises(ValueError, match="on_device=True"):
        ArrayDataModule(train=data, batch_size=8, mesh=Mesh(np.asarray(jax.devices()), ("batch",)))


def test_device_loader_serves_any_pytree_with_a_short_last_batch():
    data = _data()
    n = len(data["label"])
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    loader = DeviceBatchLoader(put_replicated((data["image"], data["label"]), mesh), 8)
    batches = list(loader)
    assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
    assert [len(b[1]) for b in batches] == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(b[1]) for b in batches]), data["label"]
    )


def test_order_argument_errors():
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        EpochOrder(10, 4, shuffle=False, seed=0, epoch=0, drop_last=True, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        EpochOrder(
            10, 4, shuffle=False, seed=0, epoch=0, drop_last=True, process_index=2, process_count=2
        )
    loader = BatchLoader(_data(), 8)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        loader.iter_from(8)
    with pytest.raises(TypeError, match="int"):
        loader.iter_from(1.5)


def test_pixel_decode_host_and_device_agree_exactly():
    decode = PixelDecode(CIFAR10.mean, CIFAR10.std)
    x = np.arange(256 * 3, dtype=np.int64).reshape(1, 3, 16, 16).astype(np.uint8)
    host = decode({"image": x, "label": np.zeros(1, np.int32)})
    device = jax.jit(decode)({"image": jnp.asarray(x), "label": jnp.zeros(1, jnp.int32)})
    np.testing.assert_array_equal(host["image"], np.asarray(device["image"]))
    expected = (x / 255.0 - np.asarray(CIFAR10.mean)[None, :, None, None]) / np.asarray(
        CIFAR10.std
    )[None, :, None, None]
    np.testing.assert_allclose(host["image"], expected, rtol=0, atol=1e-6)
    assert host["image"].dtype == np.float32
    np.testing.assert_allclose(
        decode.fill_value(), -np.asarray(CIFAR10.mean) / CIFAR10.std, rtol=1e-6
    )
    with pytest.raises(ValueError, match="positive"):
        PixelDecode((0.5,), (0.0,))
    with pytest.raises(ValueError, match="statistics for 3 channels"):
        decode({"image": np.zeros((1, 2, 4, 4), np.uint8)})


def _images(n=6, c=3, h=8, w=8):
    return jnp.asarray(np.random.default_rng(0).normal(size=(n, c, h, w)).astype(np.float32))


def test_crop_flip_outputs_are_crops_of_the_padded_image():
    x = _images()
    fill = (-1.0, -2.0, -3.0)
    out = RandomCropFlip(padding=2, fill=fill)(
        {"image": x, "label": jnp.arange(6)}, jax.random.key(3)
    )
    assert out["image"].shape == x.shape and out["image"].dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(6))
    padded = np.broadcast_to(
        np.asarray(fill, np.float32)[None, :, None, None], (6, 3, 12, 12)
    ).copy()
    padded[:, :, 2:10, 2:10] = np.asarray(x)
    for i in range(6):
        candidates = []
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy : dy + 8, dx : dx + 8]
                candidates += [(crop, False), (crop[..., ::-1], True)]
        matches = [f for c, f in candidates if np.array_equal(c, np.asarray(out["image"][i]))]
        assert matches, f"image {i} is not a crop of its padded input"


def test_crop_flip_identity_without_padding_or_flip():
    x = _images()
    out = RandomCropFlip(padding=0, flip=False)({"image": x}, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out["image"]), np.asarray(x))
    with pytest.raises(ValueError, match="channel-first"):
        RandomCropFlip()({"image": x[0]}, jax.random.key(0))
    with pytest.raises(ValueError, match="padding"):
        RandomCropFlip(padding=-1)


def test_step_keyed_augmentation_is_deterministic_and_resumable():
    transform = StepKeyed(RandomCropFlip(padding=4), seed=7)
    batch = {"image": _images(8, 3, 32, 32)}
    eager = transform(batch, 5)
    jitted = jax.jit(transform)(batch, jnp.int32(5))
    np.testing.assert_array_equal(np.asarray(eager["image"]), np.asarray(jitted["image"]))
    np.testing.assert_array_equal(
        np.asarray(transform(batch, 5)["image"]), np.asarray(eager["image"])
    )
    assert not np.array_equal(np.asarray(transform(batch, 6)["image"]), np.asarray(eager["image"]))
    other_seed = StepKeyed(RandomCropFlip(padding=4), seed=8)
    assert not np.array_equal(np.asarray(other_seed(batch, 5)["image"]), np.asarray(eager["image"]))
    assert transform == StepKeyed(transform.augment, 7) and hash(transform) == hash(
        StepKeyed(transform.augment, 7)
    )


def test_augmentation_does_not_depend_on_sharding():
    transform = StepKeyed(RandomCropFlip(padding=4), seed=0)
    batch = {"image": _images(8, 3, 32, 32)}
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("batch")))
    single = jax.jit(transform)(batch, jnp.int32(11))
    split = jax.jit(transform)(sharded, jnp.int32(11))
    np.testing.assert_array_equal(np.asarray(single["image"]), np.asarray(split["image"]))


def test_cifar_device_transform_contract(tmp_path):
    write_cifar_binary(tmp_path)
    plain = CIFAR10(tmp_path, batch_size=16, download=False)
    assert plain.device_transform is None
    dm = CIFAR10(tmp_path, batch_size=16, augment=True, download=False, on_device=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    transform = dm.device_transform
    assert transform == dm.device_transform  # stable: no recompilation of a step using it
    out = jax.jit(transform)(batch, jnp.int32(0))
    assert out["image"].shape == batch["image"].shape
    assert set(out) == set(batch)
    np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(batch["label"]))
    assert not np.array_equal(np.asarray(out["image"]), np.asarray(batch["image"]))
    # padding takes the normalised value of a black pixel, as torchvision's RandomCrop does
    black = PixelDecode(CIFAR10.mean, CIFAR10.std).fill_value()
    assert transform.augment.fill == pytest.approx(tuple(black))
    # evaluation batches are never augmented: the loaders do not apply it
    val = next(iter(dm.val_dataloader()))
    host = CIFAR10(tmp_path, batch_size=16, augment=True, download=False)
    host.setup("fit")
    np.testing.assert_array_equal(
        np.asarray(val["image"]), next(iter(host.val_dataloader()))["image"]
    )


def test_array_datamodule_augment_becomes_a_step_keyed_device_transform():
    seen = []

    def augment(batch, key):
        seen.append(key)
        return {**batch, "x": batch["x"] + jax.random.normal(key, batch["x"].shape)}

    data = {"x": np.zeros((16, 3), np.float32)}
    assert ArrayDataModule(train=data, batch_size=8).device_transform is None
    dm = ArrayDataModule(train=data, batch_size=8, seed=3, augment=augment)
    out = dm.device_transform(data, 7)
    expected_key = jax.random.fold_in(jax.random.key(3), 7)
    assert jnp.array_equal(jax.random.key_data(seen[0]), jax.random.key_data(expected_key))
    noise = jax.random.normal(expected_key, (16, 3))
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(noise))


def test_device_loader_uploads_host_arrays_itself():
    data = _data()
    loader = DeviceBatchLoader(data, 8, shuffle=True, seed=1, epoch=2, drop_last=True)
    assert all(isinstance(v, jax.Array) for v in loader.arrays.values())
    host = BatchLoader(data, 8, shuffle=True, seed=1, epoch=2, drop_last=True)
    for x, y in zip(loader.iter_from(3), host.iter_from(3), strict=True):
        np.testing.assert_array_equal(np.asarray(x["image"]), y["image"])
