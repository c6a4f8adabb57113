"""Several `ModelCheckpoint`s saving at the same moment: each checkpoint records the books every
callback keeps after all of that moment's saves, so a run resumed from any of them keeps (and
deletes) exactly what the uninterrupted run does."""

import json
import signal
from pathlib import Path

import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, ModelCheckpoint

SCORES = [0.5, 0.2, 0.9, 0.3, 0.4]


class _Scores(Callback):
    """Sets `val/score` to a chosen value at every epoch (before the ModelCheckpoints run)."""

    def provided_metrics(self):
        return ("val/score",)

    def on_validation_end(self, trainer, experiment):
        trainer.log_metrics({"val/score": SCORES[trainer.current_epoch]})


class _InterruptAt(Callback):
    """SIGINT while step `step` runs: the run stops at the step boundary after it."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            signal.raise_signal(signal.SIGINT)


# (the two callbacks' arguments, how the first run stops, the epochs of the whole run)
CASES = {
    # both save at every epoch end: the top 2 by score plus the last, and the last only
    "epoch_ends": ({"monitor": "val/score", "save_top_k": 2}, {}, ("epochs", 2), 5),
    # both save every 4 steps, stopped right after the saves at step 12
    "steps": (
        {"monitor": "val/score", "save_top_k": 2, "every_n_train_steps": 4, "every_n_epochs": None},
        {"every_n_train_steps": 4, "every_n_epochs": None},
        ("interrupt", 12),
        4,
    ),
    # both save at epoch ends; a signal after step 11 makes both save there
    "interrupt": ({"monitor": "val/score", "save_top_k": 2}, {}, ("interrupt", 11), 4),
    # the first saves every 3 steps, the second at epoch ends: a signal after step 6 meets
    # the first's step save and the second's interrupt save
    "step_and_interrupt": (
        {"every_n_train_steps": 3, "every_n_epochs": None},
        {},
        ("interrupt", 6),
        3,
    ),
}


def _fit(root: Path, case: str, max_epochs: int, stop=None, ckpt_path=None):
    first, second, _, _ = CASES[case]
    checkpoints = [ModelCheckpoint(root / "a", **first), ModelCheckpoint(root / "b", **second)]
    callbacks = [_Scores(), *checkpoints]
    if stop is not None:
        callbacks.append(_InterruptAt(stop))
    trainer = solstice.Trainer(
        max_epochs=max_epochs,
        devices=1,
        log_every_n_steps=4,
        enable_progress_bar=False,
        callbacks=callbacks,
    )
    experiment = make_mlp_experiment(in_size=8, num_classes=4)
    if stop is None:
        trainer.fit(experiment, blobs_datamodule(), ckpt_path=ckpt_path)
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(experiment, blobs_datamodule(), ckpt_path=ckpt_path)
    return checkpoints


def _names(dirpath: Path) -> list[str]:
    return sorted(p.name for p in dirpath.iterdir() if p.is_dir())  # (not history.jsonl)


def _books(checkpoints, root: Path) -> list[dict]:
    return [
        json.loads(json.dumps(cb.state_dict()).replace(str(root), "<root>")) for cb in checkpoints
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_keeps_exactly_what_the_uninterrupted_run_keeps(tmp_path, case):
    _, _, (how, at), epochs = CASES[case]
    whole = _fit(tmp_path / "whole", case, epochs)

    resumed_root = tmp_path / "resumed"
    if how == "epochs":
        _fit(resumed_root, case, at)
    else:
        stopped = _fit(resumed_root, case, epochs, stop=at)
        assert Path(stopped[0].last_model_path).name.endswith(f"-step={at}")
        assert Path(stopped[1].last_model_path).name.endswith(f"-step={at}")
    resumed = _fit(resumed_root, case, epochs, ckpt_path="last")  # the first's directory

    for sub in ("a", "b"):
        assert _names(resumed_root / sub) == _names(tmp_path / "whole" / sub), sub
    assert _books(resumed, resumed_root) == _books(whole, tmp_path / "whole")


def test_a_save_of_the_same_moment_that_never_commits(tmp_path, monkeypatch):
    """The first callback's checkpoint records the second's books with the second's save of
    that moment in them. If that save never commits (it failed here; a process killed while
    writing it is the same), what its books dropped for it is still deleted once the resumed
    run's next save of the second callback commits: nothing is left behind."""
    import solstice.checkpointing._orbax as orbax_io

    real = orbax_io.write_metadata

    def fails_for_the_second_at_step_16(directory, metadata):
        if Path(directory).parent.name == "b" and metadata["progress"]["global_step"] == 16:
            raise OSError(28, "No space left on device")
        real(directory, metadata)

    whole = _fit(tmp_path / "whole", "epoch_ends", 5)
    root = tmp_path / "resumed"
    monkeypatch.setattr(orbax_io, "write_metadata", fails_for_the_second_at_step_16)
    with pytest.warns(RuntimeWarning, match=r"could not write .*epoch=1-step=16"):
        stopped = _fit(root, "epoch_ends", 2)
    monkeypatch.setattr(orbax_io, "write_metadata", real)
    assert _names(root / "b") == ["epoch=0-step=8"]  # kept: its successor never committed
    assert stopped[1].last_model_path == str(root / "b" / "epoch=0-step=8")

    resumed = _fit(root, "epoch_ends", 5, ckpt_path="last")
    for sub in ("a", "b"):
        assert _names(root / sub) == _names(tmp_path / "whole" / sub), sub
    assert _books(resumed, root) == _books(whole, tmp_path / "whole")


def test_saves_of_the_same_moment_in_one_directory_get_their_own_names(tmp_path):
    checkpoints = [ModelCheckpoint(tmp_path, save_top_k=-1), ModelCheckpoint(tmp_path)]
    trainer = solstice.Trainer(
        max_epochs=1, devices=1, enable_progress_bar=False, callbacks=checkpoints
    )
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert _names(tmp_path) == ["epoch=0-step=8", "epoch=0-step=8-v1"]
    assert [Path(cb.last_model_path).name for cb in checkpoints] == _names(tmp_path)
