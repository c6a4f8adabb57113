"""Golden tests: the exact order of hook calls for fit, validate, test and predict."""

import pytest
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice._hook_names import HOOK_NAMES
from solstice.callbacks import Callback

CALLS: list[str] = []


def _recording_method(name):
    def method(self, trainer, *args):
        tag = f"{self.tag}:{name}"
        if name.endswith("batch_start"):
            tag += f"[{args[-1]}]"
        elif name.endswith("batch_end"):
            tag += f"[{args[-1]}]"
        elif name == "on_log":
            stages = sorted({k.split("/")[0] for k in args[-2] if "/" in k})
            tag += f"[{'+'.join(stages)}@{args[-1]}]"
        CALLS.append(tag)

    method.__name__ = name
    return method


Recorder = type(
    "Recorder",
    (Callback,),
    {"tag": "cb", **{name: _recording_method(name) for name in HOOK_NAMES}},
)


def _recording_experiment_hook(name):
    record = _recording_method(name)

    def method(self, trainer, *args):
        record(self, trainer, *([None] + list(args)))  # experiment hooks have no experiment arg
        return None

    method.__name__ = name
    return method


class _Base(solstice.ClassificationExperiment):
    @property
    def tag(self):
        return "exp"


RecordingExperiment = type(
    "RecordingExperiment",
    (_Base,),
    {name: _recording_experiment_hook(name) for name in HOOK_NAMES},
)


def _exp():
    base = make_mlp_experiment(in_size=8, num_classes=4)
    return RecordingExperiment(base.model, base.optimizer, 4, key=base.key)


def _both(name):
    return [f"exp:{name}", f"cb:{name}"]


def _batches(stage, n):
    out = []
    for i in range(n):
        out += _both(f"on_{stage}_batch_start") + _both(f"on_{stage}_batch_end")
        out[-4:] = [s + f"[{i}]" for s in out[-4:]]
    return out


def _eval(stage, prefix, step, n=2):
    return (
        _both(f"on_{stage}_start")
        + _both(f"on_{stage}_epoch_start")
        + _batches(stage, n)
        + [f"exp:on_log[{prefix}@{step}]", f"cb:on_log[{prefix}@{step}]"]
        + _both(f"on_{stage}_epoch_end")
        + _both(f"on_{stage}_end")
    )


@pytest.fixture
def trainer():
    CALLS.clear()
    return solstice.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        log_every_n_steps=2,
        callbacks=[Recorder()],
        enable_progress_bar=False,
        devices=1,
    )


def test_fit_hook_order(trainer):
    trainer.fit(_exp(), blobs_datamodule())
    expected = _both("on_fit_start") + _both("on_train_start")
    step = 0
    for _epoch in range(2):
        expected += _both("on_train_epoch_start")
        for i in range(3):
            expected += [f"exp:on_train_batch_start[{i}]", f"cb:on_train_batch_start[{i}]"]
            expected += [f"exp:on_train_batch_end[{i}]", f"cb:on_train_batch_end[{i}]"]
            step += 1
            if step % 2 == 0:  # log interval
                expected += [f"exp:on_log[train@{step}]", f"cb:on_log[train@{step}]"]
        if step % 2:  # the partial interval is closed at epoch end
            expected += [f"exp:on_log[train@{step}]", f"cb:on_log[train@{step}]"]
        expected += [f"exp:on_log[train@{step}]", f"cb:on_log[train@{step}]"]  # *_epoch
        expected += _eval("validation", "val", step)
        expected += _both("on_train_epoch_end")
    expected += _both("on_train_end") + _both("on_fit_end")
    assert CALLS == expected


def test_validate_and_test_hook_order(trainer):
    exp = _exp()
    trainer.validate(exp, blobs_datamodule())
    assert CALLS == _eval("validation", "val", 0)
    CALLS.clear()
    trainer.test(exp, blobs_datamodule())
    assert CALLS == _eval("test", "test", 0)


def test_predict_hook_order(trainer):
    trainer.predict(_exp(), blobs_datamodule())
    assert CALLS == (
        _both("on_predict_start")
        + _both("on_predict_epoch_start")
        + _batches("predict", 2)
        + _both("on_predict_epoch_end")
        + _both("on_predict_end")
    )


def test_exception_hook_fires_then_error_propagates(trainer):
    class Boom(Callback):
        def on_train_epoch_end(self, trainer, experiment):
            raise RuntimeError("boom")

    trainer = solstice.Trainer(
        max_epochs=1, callbacks=[Boom(), Recorder()], enable_progress_bar=False, devices=1
    )
    CALLS.clear()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert CALLS[-1] == "cb:on_exception"


def test_unused_per_batch_hooks_are_never_called(monkeypatch):
    """A hook nobody overrides costs nothing: the dispatcher is not even entered per batch."""
    from solstice.trainer import _hooks

    counts = {}
    real_call = _hooks.Hooks.call

    def counting_call(self, name, *args):
        counts[name] = counts.get(name, 0) + 1
        return real_call(self, name, *args)

    monkeypatch.setattr(_hooks.Hooks, "call", counting_call)
    trainer = solstice.Trainer(max_epochs=2, enable_progress_bar=False, devices=1)
    trainer.fit(make_mlp_experiment(in_size=8, num_classes=4), blobs_datamodule())
    assert not any("batch" in name for name in counts), counts


def test_misspelt_hook_names_the_closest_real_one():
    with pytest.raises(TypeError, match="on_train_epoch_end"):

        class Typo(Callback):
            def on_train_epoch_ends(self, trainer, experiment):
                pass

    with pytest.raises(TypeError, match="on_validation_epoch_start"):

        class ExpTypo(solstice.ClassificationExperiment):
            def on_validaton_epoch_start(self, trainer):
                pass

    class Fine(Callback):  # unrelated on_* helpers are allowed
        def on_device(self):
            pass
