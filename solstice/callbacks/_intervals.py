"""Which `on_log` records are the Trainer's training log intervals."""

from collections.abc import Mapping
from typing import Any

from ..loggers._packed import PackedMetrics


def is_train_interval(metrics: Mapping[str, Any]) -> bool:
    """Whether `metrics` (an `on_log` record) is the Trainer's record of a training log
    interval: the `train/*` metrics it publishes every `log_every_n_steps` steps and for an
    epoch's last, partial interval, packed on the device. Records that callbacks log with
    `trainer.log_metrics` (even `train/grad_norm`) and the epoch's `train/*_epoch` record
    are not, so a callback that logs at intervals never answers its own record."""
    return isinstance(metrics, PackedMetrics) and any(k.startswith("train/") for k in metrics)


def is_train_epoch_end(metrics: Mapping[str, Any]) -> bool:
    """Whether `metrics` is the Trainer's record of a training epoch's metrics
    (`train/<name>_epoch`, published at each epoch's end)."""
    return any(k.startswith("train/") and k.endswith("_epoch") for k in metrics)
