"""ColourMNIST's construction and the torch adapter's conversions."""

import numpy as np
import pytest

from solstice.datamodules import ColourMNIST, Digits, TorchDataModule
from solstice.datamodules._colour_mnist import MEAN_COLOURS

pytestmark = pytest.mark.usefixtures("strict_promotion")


def _gray_splits(n_train=400, n_test=400, size=6, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        image = (rng.random((n, 1, size, size)) > 0.5).astype(np.float32)
        image[:, 0, 0, 0] = 1.0  # every digit has some foreground
        if dtype == np.uint8:
            image = (image * 255).astype(np.uint8)
        return {"image": image, "label": rng.integers(0, 10, n).astype(np.int32)}

    return {"train": split(n_train), "test": split(n_test)}


def _all(loader):
    batches = [{k: np.asarray(v) for k, v in b.items()} for b in loader]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_colour_mnist_construction(dtype):
    gray = _gray_splits(dtype=dtype)
    dm = ColourMNIST(gray, batch_size=40, variance=0.02, shuffle=False)
    dm.setup("fit")
    train, test = _all(dm.train_dataloader()), _all(dm.test_dataloader())
    gray_train = gray["train"]["image"].astype(np.float32)
    if dtype == np.uint8:
        gray_train = gray_train / np.float32(255)
    # train: the colour is the label's (the bias); the foreground carries it, background black
    np.testing.assert_array_equal(train["colour"], train["label"])
    rgb = dm.splits["train"]["rgb"]
    np.testing.assert_allclose(train["image"], gray_train * rgb[:, :, None, None], rtol=1e-6)
    assert train["image"].shape == (400, 3, 6, 6) and train["image"].dtype == np.float32
    assert train["image"].min() >= 0 and train["image"].max() <= 1
    np.testing.assert_array_equal(train["image"][gray_train[:, [0, 0, 0]] == 0], 0.0)
    # the noise around each mean colour has the requested variance (before clipping)
    noise = rgb - MEAN_COLOURS[train["colour"]]
    inside = (rgb > 0) & (rgb < 1)
    assert np.std(noise[inside]) == pytest.approx(np.sqrt(0.02), rel=0.25)
    # test: colour drawn independently of the label, uniformly over the ten
    assert np.mean(test["colour"] == test["label"]) < 0.25
    assert set(np.unique(test["colour"])) == set(range(10))
    counts = np.bincount(test["colour"], minlength=10)
    assert counts.min() > 15


def test_colour_mnist_variance_controls_the_bias():
    gray = _gray_splits()
    spread = []
    for variance in (0.0, 0.02, 0.05):
        dm = ColourMNIST(gray, batch_size=40, variance=variance)
        dm.setup("fit")
        rgb = dm.splits["train"]["rgb"]
        spread.append(np.abs(rgb - MEAN_COLOURS[dm.splits["train"]["label"]]).mean())
    assert spread[0] == pytest.approx(0.0, abs=1e-7) and spread[0] < spread[1] < spread[2]


def test_colour_mnist_is_deterministic_by_seed():
    def colours(seed):
        dm = ColourMNIST(Digits(batch_size=32), seed=seed)
        dm.setup("fit")
        return dm.splits["train"]["rgb"], dm.splits["test"]["colour"]

    a, b, c = colours(0), colours(0), colours(1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_colour_mnist_inherits_batch_sizes_and_validates():
    dm = ColourMNIST(Digits(batch_size=32, eval_batch_size=48))
    assert (dm.batch_size, dm.eval_batch_size) == (32, 48)
    dm = ColourMNIST(Digits(batch_size=32, eval_batch_size=48), batch_size=16)
    assert (dm.batch_size, dm.eval_batch_size) == (16, 16)
    with pytest.raises(TypeError, match="batch_size"):
        ColourMNIST(_gray_splits())
    with pytest.raises(TypeError, match="ArrayDataModule"):
        ColourMNIST([1, 2, 3], batch_size=8)
    with pytest.raises(ValueError, match="'train' split"):
        ColourMNIST({"test": _gray_splits()["test"]}, batch_size=8)
    with pytest.raises(ValueError, match="variance"):
        ColourMNIST(_gray_splits(), batch_size=8, variance=-0.1)
    with pytest.raises(ValueError, match=r"shape \(num_colours, 3\)"):
        ColourMNIST(_gray_splits(), batch_size=8, colours=np.zeros((10, 4)))
    rgb_source = _gray_splits()
    rgb_source["train"]["image"] = np.repeat(rgb_source["train"]["image"], 3, axis=1)
    with pytest.raises(ValueError, match=r"grayscale digits `\(N, 1, H, W\)`"):
        ColourMNIST(rgb_source, batch_size=8).setup("fit")
    many_classes = _gray_splits()
    many_classes["train"]["label"][0] = 12
    with pytest.raises(ValueError, match="10 mean colours"):
        ColourMNIST(many_classes, batch_size=8).setup("fit")


# ---------------------------------------------------------------------------------------------
# torch


def test_torch_dataloaders_pass_through_converted():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.arange(30 * 2, dtype=torch.float64).reshape(30, 2)
    y = torch.arange(30) % 3
    train = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    val = DataLoader(TensorDataset(x, y), batch_size=8)
    dm = TorchDataModule(train=train, val=val, keys=("x", "y"))
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 3
    assert batches[0]["x"].dtype == np.float32 and batches[0]["y"].dtype == np.int32
    np.testing.assert_array_equal(batches[1]["x"], x[8:16].numpy().astype(np.float32))
    resumed = list(dm.train_dataloader().iter_from(2))
    np.testing.assert_array_equal(resumed[0]["x"], batches[2]["x"])
    val_batches = list(dm.val_dataloader())
    # the short last batch comes as it is (the Trainer runs it so every sample counts once)
    assert [b["x"].shape[0] for b in val_batches] == [8, 8, 8, 6]
    assert set(val_batches[-1]) == {"x", "y"}


def test_torch_keys_none_keeps_the_samples_structure():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)
    y = torch.arange(10) % 3
    dm = TorchDataModule(
        train=TensorDataset(x, y),
        val=DataLoader(TensorDataset(x, y), batch_size=4),
        batch_size=4,
        keys=None,
        shuffle=False,
    )
    first = next(iter(dm.train_dataloader()))
    assert isinstance(first, tuple) and len(first) == 2
    np.testing.assert_array_equal(first[0], x[:4].numpy())
    assert first[1].dtype == np.int32
    val = list(dm.val_dataloader())
    assert [type(b) for b in val] == [tuple] * 3 and [len(b[1]) for b in val] == [4, 4, 2]


def test_torch_distributed_sampler_gets_the_epoch():
    import torch
    from torch.utils.data import DataLoader, Sampler, TensorDataset

    class Recording(Sampler):
        def __init__(self, n):
            self.n, self.epochs = n, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def __iter__(self):
            return iter(range(self.n))

        def __len__(self):
            return self.n

    sampler = Recording(10)
    loader = DataLoader(TensorDataset(torch.zeros(10, 1)), batch_size=5, sampler=sampler)
    dm = TorchDataModule(train=loader, keys=("x",))
    dm.set_epoch(4)
    dm.train_dataloader()
    assert sampler.epochs == [4]


def test_torch_samples_of_every_shape():
    import torch
    from torch.utils.data import Dataset

    class Triples(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.full((2,), i, np.uint8), torch.tensor(i), float(i) / 2

    dm = TorchDataModule(train=Triples(), batch_size=4, keys=("a", "b", "c"), shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["a"].dtype == np.uint8 and batch["a"].shape == (4, 2)
    assert batch["b"].dtype == np.int32 and batch["c"].dtype == np.float32
    np.testing.assert_array_equal(batch["b"], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="3 entries but `keys` names 2"):
        next(iter(TorchDataModule(train=Triples(), batch_size=4).train_dataloader()))


def test_torch_argument_errors():
    import torch
    from torch.utils.data import IterableDataset, TensorDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="IterableDataset"):
        TorchDataModule(train=Stream(), batch_size=2)
    with pytest.raises(TypeError, match="map-style"):
        TorchDataModule(train=object(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TorchDataModule(train=TensorDataset(torch.zeros(4)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        TorchDataModule(train=TensorDataset(torch.zeros(4)), batch_size=8).train_dataloader()
    with pytest.raises(ValueError, match="no `train` split"):
        TorchDataModule(val=TensorDataset(torch.zeros(4)), batch_size=2).train_dataloader()
