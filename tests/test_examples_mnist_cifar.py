"""The MNIST MLP and CIFAR-10 ConvNeXt examples, run end to end in their smoke modes.

The smoke modes write small files in the datasets' exact on-disk formats (`examples/_synthetic.py`)
and train the real pipeline on them: files parsed, decoded, split, batched, sharded over the 4
fake CPU devices of `conftest.py`, trained, checkpointed, reloaded and tested.
"""

import csv
import gzip
import importlib.util
import logging
import math
import struct
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solstice
from solstice.datamodules import CIFAR10, MNIST

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONF = EXAMPLES / "conf"


def load_example(name: str):
    """Import `examples/<name>.py` as a module (examples are scripts, not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # for their `import _synthetic`
    spec = importlib.util.spec_from_file_location(
        f"solstice_example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic():
    return load_example("_synthetic")


@pytest.fixture(scope="module")
def mnist_example():
    return load_example("mnist_mlp")


@pytest.fixture(autouse=True)
def keep_log_levels():
    """The examples' `main` turns Solstice's INFO lines on; leave other tests as they were."""
    loggers = [logging.getLogger(name) for name in ("solstice", "cifar_convnext")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture(scope="module")
def cifar_example():
    return load_example("cifar_convnext")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("cifar_convnext", overrides=list(overrides))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# the synthetic files are the real formats


def test_synthetic_mnist_files_are_idx(tmp_path, synthetic):
    raw = Path(synthetic.write_mnist(tmp_path, num_train=40, num_test=12, seed=3))
    assert sorted(p.name for p in raw.iterdir()) == sorted(synthetic.MNIST_FILES)
    data = gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">HBB", data[:4]) == (0, 0x08, 3)  # magic: ubyte, 3 dimensions
    assert struct.unpack(">III", data[4:16]) == (40, 28, 28)
    assert len(data) == 16 + 40 * 28 * 28
    labels = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert struct.unpack(">HBBI", labels[:8]) == (0, 0x08, 1, 12) and len(labels) == 8 + 12

    dm = MNIST(tmp_path, batch_size=8, val_fraction=0.0, shuffle=False, download=False)
    dm.setup("fit")
    images, labels = synthetic.prototype_images(40, (28, 28), seed=3)
    np.testing.assert_array_equal(dm.splits["train"]["image"][:, 0], images)
    np.testing.assert_array_equal(dm.splits["train"]["label"], labels)


def test_synthetic_cifar_files_are_binary_batches(tmp_path, synthetic):
    folder = Path(synthetic.write_cifar10(tmp_path, num_per_batch=6, num_test=5, seed=1))
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([*synthetic.CIFAR_TRAIN_FILES, synthetic.CIFAR_TEST_FILE])
    record = (folder / "data_batch_1.bin").read_bytes()
    assert len(record) == 6 * 3073
    images, labels = synthetic.prototype_images(6, (3, 32, 32), seed=1)
    assert record[0] == labels[0]
    assert record[1 : 1 + 1024] == images[0, 0].tobytes()  # the red plane, row-major

    dm = CIFAR10(
        tmp_path, batch_size=6, val_fraction=0.0, normalize=False, shuffle=False, download=False
    )
    dm.setup("fit")
    assert dm.splits["train"]["label"].shape == (30,)
    np.testing.assert_array_equal(dm.splits["train"]["image"][:6], images)
    assert dm.splits["test"]["image"].shape == (5, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# MNIST MLP


def test_mnist_smoke_trains_checkpoints_and_resumes(tmp_path, mnist_example):
    out = tmp_path / "run"
    common = ["--smoke", "--no-progress-bar", "--out", str(out)]
    first = mnist_example.main([*common, "--epochs", "1"])
    assert set(first) >= {"test/accuracy", "test/loss", "test/f1_macro"}
    assert all(math.isfinite(v) for v in first.values())

    metrics = mnist_example.main([*common, "--epochs", "2", "--resume"])
    # class-prototype images: two short epochs take the MLP far above chance (0.1)
    assert metrics["test/accuracy"] > 0.4, metrics
    assert metrics["test/loss"] < first["test/loss"]

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert any(name.startswith("epoch=1-") for name in checkpoints), checkpoints
    rows = read_csv(out / "logs" / "metrics.csv")
    epochs = {row["epoch"] for row in rows if row.get("val/accuracy")}
    assert epochs == {"0", "1"}  # the resumed run continued the log at epoch 1


# ---------------------------------------------------------------------------------------------
# CIFAR-10 ConvNeXt


def test_cifar_config_composes_with_overrides():
    cfg = compose()
    assert list(cfg.model.depths) == [2, 2, 6, 2] and cfg.trainer.devices == "auto"
    assert cfg.data.augment and cfg.optim.lr == pytest.approx(2e-3)
    cfg = compose("model=convnext_cifar_nano", "model.depths=[1,1,1,1]", "optim.accumulate=2")
    assert list(cfg.model.depths) == [1, 1, 1, 1] and list(cfg.model.dims) == [32, 64, 128, 256]
    assert cfg.optim.accumulate == 2


def test_convnext_follows_the_paper(cifar_example):
    cx = cifar_example
    m = compose("model.depths=[1,2]", "model.dims=[8,16]", "model.drop_path_rate=0.5").model
    model = cx.make_model(m, jax.random.key(0))
    block = model.stages[1][1]
    assert block.dwconv.kernel_size == (7, 7) and block.dwconv.groups == 16  # depthwise 7x7
    assert block.pwconv1.out_features == 4 * 16  # inverted bottleneck
    np.testing.assert_allclose(block.gamma, 1e-6)  # layer scale
    assert [b.drop_path.p for stage in model.stages for b in stage] == [0.0, 0.25, 0.5]
    assert model.stem.layers[0].stride == (2, 2)  # 2x2 patchify stem
    assert model.downsamples[0].layers[1].stride == (2, 2)
    weights = [block.dwconv.weight, block.pwconv1.weight, model.head.weight]
    assert all(float(jnp.max(jnp.abs(w))) <= 0.04 for w in weights)  # 2 std of 0.02
    assert 0.015 < float(jnp.std(block.pwconv1.weight)) < 0.02  # truncation shrinks it
    assert not jnp.any(block.pwconv1.bias) and not jnp.any(model.head.bias)

    forward = eqx.filter_jit(lambda model, x, key: model(x, key=key))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32))
    assert forward(model, x, jax.random.key(2)).shape == (10,)
    with pytest.raises(ValueError, match="needs a `key`"):
        forward(model, x, None)  # stochastic depth in training needs a key
    inference = eqx.nn.inference_mode(model)  # what ClassificationExperiment evaluates
    assert all(b.drop_path.inference for stage in inference.stages for b in stage)
    assert inference.stages[1][1].drop_path(x, key=None) is x
    dropped = [block.drop_path(x, key=jax.random.key(k)) for k in range(8)]
    assert {float(jnp.max(jnp.abs(d))) == 0.0 for d in dropped} == {True, False}

    m = compose().model
    shapes = eqx.filter_eval_shape(
        lambda: cx.ConvNeXt(10, m.depths, m.dims, patch_size=m.patch_size, key=jax.random.key(0))
    )
    params = sum(x.size for x in jax.tree.leaves(shapes) if hasattr(x, "shape"))
    assert 8.4e6 < params < 8.7e6  # as the config file says


def test_cifar_smoke_data_parallel_with_checkpoints(tmp_path, cifar_example):
    cfg = compose(
        "smoke=true",
        # one stage of one block: the whole pipeline at the least compile time (the
        # architecture is checked above)
        "model.depths=[1]",
        "model.dims=[8]",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        f"output_dir={tmp_path}",
    )
    metrics = cifar_example.run(cfg)
    assert set(metrics) >= {"test/accuracy", "test/loss"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["test/accuracy"] <= 1.0

    (checkpoint,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    assert checkpoint.name.startswith("epoch=0-step=4")  # smoke: 4 training batches
    solstice.checkpointing.verify(checkpoint)
    rows = read_csv(tmp_path / "logs" / "metrics.csv")
    assert any(row.get("val/accuracy") for row in rows)


def test_cifar_build_shards_over_every_device(tmp_path, cifar_example, synthetic):
    synthetic.write_cifar10(tmp_path, num_per_batch=16, num_test=8)
    cfg = cifar_example.smoke_config(compose("model.depths=[1]", "model.dims=[8]"))
    experiment, datamodule, trainer, checkpoint = cifar_example.build(cfg, str(tmp_path), None)
    assert checkpoint is None
    assert len(trainer.devices) == jax.device_count() == 4
    batch = next(iter(datamodule.train_dataloader()))  # on the devices already, sharded
    assert batch["image"].shape == (32, 3, 32, 32)
    assert len(batch["image"].sharding.device_set) == 4
    assert datamodule.device_transform is not None  # augmentation runs on the device
