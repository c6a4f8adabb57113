"""Small host batches travel to the device in chunks (one upload for several steps); every
step still trains on exactly the batch it would have had one upload per step."""

import numpy as np
import pytest
from helpers import blobs, make_mlp_experiment, params_of

import solstice
from solstice.datamodules import ArrayDataModule
from solstice.trainer import _feeder, _train_input
from solstice.trainer._placement import Placement, aligned_empty


class _PerBatchHook(solstice.callbacks.Callback):
    """A per-batch hook needs the batch itself, which turns chunking off."""

    def __init__(self):
        self.seen = 0

    def on_train_batch_end(self, trainer, experiment, metrics, batch, batch_idx):
        self.seen += 1


def _fit(callbacks=(), **kw):
    kw.setdefault("max_epochs", 2)
    dm = ArrayDataModule(train=blobs(230), val=blobs(40, seed=1), batch_size=16, seed=3)
    trainer = solstice.Trainer(
        enable_progress_bar=False, devices=1, log_every_n_steps=4, callbacks=list(callbacks), **kw
    )
    exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), dm)
    trainer.flush_logs()
    return trainer, exp


def _record_feeders(monkeypatch):
    made = []
    real = _train_input.Feeder

    def recording(batches, prepare, placement, **kw):
        made.append(kw.get("chunked", False))  # (evaluation has a feed of its own)
        return real(batches, prepare, placement, **kw)

    monkeypatch.setattr(_train_input, "Feeder", recording)
    return made


@pytest.mark.parametrize("max_chunk", [5, 16])
def test_chunked_training_matches_one_upload_per_step(monkeypatch, max_chunk):
    # 230 // 16 = 14 batches per epoch: with chunks of 5 the last chunk is partial (padded).
    monkeypatch.setattr(_feeder, "MAX_CHUNK", max_chunk)
    made = _record_feeders(monkeypatch)
    hook = _PerBatchHook()
    plain_trainer, plain = _fit([hook])
    chunked_trainer, chunked = _fit()
    assert made == [False, False, True, True]  # the hook turned chunking off, then on
    assert hook.seen == 28
    for a, b in zip(params_of(plain), params_of(chunked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert chunked_trainer.history.metrics == plain_trainer.history.metrics
    assert chunked_trainer.global_step == plain_trainer.global_step == 28


def test_chunked_training_stops_mid_chunk_at_max_steps(monkeypatch):
    monkeypatch.setattr(_feeder, "MAX_CHUNK", 5)
    plain_trainer, plain = _fit([_PerBatchHook()], max_steps=7)
    trainer, chunked = _fit(max_steps=7)
    assert trainer.global_step == plain_trainer.global_step == 7
    for a, b in zip(params_of(plain), params_of(chunked)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_chunk_size_follows_batch_bytes():
    small = {"x": np.zeros((32, 784), np.float32)}  # 100 KB
    big = {"x": np.zeros((256, 3, 224, 224), np.float32)}  # 154 MB
    assert _feeder.chunk_size(small) == _feeder.MAX_CHUNK
    assert _feeder.chunk_size(big) == 1
    mid = {"x": np.zeros((1 << 20,), np.uint8)}  # 1 MiB
    assert _feeder.chunk_size(mid) == 4


def test_feeder_chunks_hold_the_batches_in_order():
    placement = Placement(1)
    batches = [{"x": np.full((2, 3), i, np.float32)} for i in range(7)]
    prepare = _feeder.BatchPreparer(placement)
    with _feeder.Feeder(iter(batches), prepare, placement, chunked=True) as feeder:
        items = list(feeder)
    # 24-byte batches: one chunk of MAX_CHUNK (16) rows holding 7 real batches.
    assert [n for n, _ in items] == [7]
    stacked = np.asarray(items[0][1]["x"])
    assert stacked.shape == (_feeder.MAX_CHUNK, 2, 3)
    np.testing.assert_array_equal(stacked[:7, 0, 0], np.arange(7))
    np.testing.assert_array_equal(stacked[7:, 0, 0], 6)  # padding repeats the last batch


class _ReusedBuffer(solstice.datamodules.DataModule):
    """Yields every batch in the same (64-byte aligned) buffers, overwritten for the next one,
    as a loader with preallocated buffers does. The CPU backend could share such buffers
    with the device instead of copying them."""

    def __init__(self, reuse: bool):
        super().__init__()
        self.reuse = reuse
        self.data = blobs(96)

    def _batches(self):
        image = aligned_empty((16, 8), np.float32)
        label = aligned_empty((16,), np.int32)
        for start in range(0, 96, 16):
            if not self.reuse:
                image, label = np.empty_like(image), np.empty_like(label)
            image[:] = self.data["image"][start : start + 16]
            label[:] = self.data["label"][start : start + 16]
            yield {"image": image, "label": label}

    def train_dataloader(self):
        return self._batches()

    def val_dataloader(self):
        return self._batches()


@pytest.mark.parametrize("chunk, fused", [(1, 1), (16, 1), (16, 4)])
def test_a_loader_that_reuses_its_buffers_trains_like_fresh_ones(monkeypatch, chunk, fused):
    monkeypatch.setattr(_feeder, "MAX_CHUNK", chunk)
    results = []
    for reuse in (False, True):
        trainer = solstice.Trainer(
            max_epochs=2,
            enable_progress_bar=False,
            devices=1,
            prefetch=4,
            steps_per_execution=fused,
            log_every_n_steps=4,
        )
        exp = trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), _ReusedBuffer(reuse))
        results.append((params_of(exp), dict(trainer.callback_metrics)))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert results[0][1] == results[1][1]
