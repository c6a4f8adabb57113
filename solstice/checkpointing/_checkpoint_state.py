"""What a training checkpoint is: a run's state as one value, a device half and a host half.

```
CheckpointState
  device: TrainState (an eqx.Module of arrays)      -> Orbax items, never pickled
    experiment    the experiment's arrays (parameters, optimizer state, PRNG keys, ...)
    metrics       mid-epoch only: the metric accumulators {"acc": interval, "total": epoch}
    in_step       the state of each callback's in-step reduction (`Callback.in_step`)
  host: RunRecord (JSON, bounded by the callbacks' state, not by the length of the run)
    progress      epoch, global step, batch within the epoch, validations, epoch logged
    accumulating  mid-epoch only: which accumulators restart at the next step
    stopped       why and where `fit` stopped (`Trainer.stop`), or None
    callback_metrics, datamodule, callbacks, history, settings, experiment_type
```

`CheckpointState.to_checkpoint` gives what `CheckpointWriter.save` writes (`solstice.json`
holds the host half, the leaf specs of every array and what the saver adds); `read` is the
one way back. Everything a resumed run needs, and nothing else, is here.
"""

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._version import __version__
from ._orbax import read as read_items
from ._tree import (
    LeafSpec,
    abstract_storage,
    check_structure,
    from_storage,
    specs,
    storage_key,
    to_storage,
)


class StoredTree(NamedTuple):
    """Arrays read from a checkpoint whose pytree structure is known only later (the metric
    accumulators: the first training step shows their structure)."""

    specs: list[LeafSpec]
    arrays: dict[str, Any]

    def resolve(self, template: PyTree, source: str) -> PyTree:
        """The arrays as a pytree like `template` (`ValueError` listing any mismatch)."""
        check_structure(
            self.specs,
            specs(template),
            source=source,
            template_name="the training metrics of this experiment",
        )
        return from_storage(template, self.specs, self.arrays)


class TrainState(eqx.Module):
    """The device half of a run's state: every array a training step reads and writes.

    - `experiment`: the experiment's arrays (its non-array part stays with the Trainer).
    - `metrics`: `None` at an epoch boundary; mid-epoch the metric accumulators of the log
      interval and of the epoch, `{"acc": ..., "total": ...}` (a `StoredTree` when read from
      a checkpoint, until the first step shows their structure).
    - `in_step`: each in-step reduction's state, by the callback's checkpoint name.
    """

    experiment: PyTree
    metrics: PyTree
    in_step: dict[str, PyTree]


@dataclasses.dataclass
class RunRecord:
    """The host half of a run's state: JSON-able, of a size bounded by the callbacks' state
    (the metric history lives in its own file; the record holds its position)."""

    progress: dict[str, Any]
    accumulating: dict[str, Any] | None
    stopped: dict[str, Any] | None
    callback_metrics: dict[str, float]
    datamodule: dict[str, Any] | None
    callbacks: dict[str, dict[str, Any]]
    history: dict[str, Any]
    settings: dict[str, Any]
    experiment_type: str

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> "RunRecord":
        return cls(
            progress=dict(document["progress"]),
            accumulating=document.get("train_accumulators"),
            stopped=document.get("stopped"),
            callback_metrics={k: float(v) for k, v in document["callback_metrics"].items()},
            datamodule=document.get("datamodule"),
            callbacks=dict(document.get("callbacks", {})),
            history=dict(document.get("history", {})),
            settings=dict(document.get("trainer", {})),
            experiment_type=str(document.get("experiment_type", "")),
        )

    def to_document(self) -> dict[str, Any]:
        return {
            "progress": self.progress,
            "train_accumulators": self.accumulating,
            "stopped": self.stopped,
            "callback_metrics": self.callback_metrics,
            "datamodule": self.datamodule,
            "callbacks": self.callbacks,
            "history": self.history,
            "trainer": self.settings,
            "experiment_type": self.experiment_type,
        }


def _jsonable(document: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(document))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"Checkpoint state must be JSON-able (checkpoints are never pickled): {error}. "
            "Return plain dicts, lists, strings, numbers, bools and None from `state_dict()` "
            "(convert arrays with `.tolist()`)."
        ) from None


@dataclasses.dataclass
class CheckpointState:
    """A training checkpoint: the run's `TrainState` and its `RunRecord`."""

    device: TrainState
    host: RunRecord

    def to_checkpoint(self, extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`(items, metadata)` for `CheckpointWriter.save`: the arrays (still on the device;
        Orbax copies them to the host) by item, and the JSON metadata, with `extra` (who
        saved it, why, the score) added."""
        items: dict[str, Any] = {}
        trees: dict[str, Any] = {}
        parts = {
            "experiment": self.device.experiment,
            "train_accumulators": self.device.metrics,
            "in_step": self.device.in_step or None,
        }
        for name, tree in parts.items():
            if isinstance(tree, StoredTree):  # read from a checkpoint, written back as read
                items[name], trees[name] = tree.arrays, [s.to_json() for s in tree.specs]
            elif tree is not None:
                items[name], trees[name] = to_storage(tree)
        document = {
            "kind": "trainer",
            "created_unix_ns": time.time_ns(),
            "solstice_version": __version__,
            "trees": trees,
            **self.host.to_document(),
            **extra,
        }
        return items, _jsonable(document)

    @classmethod
    def read(
        cls,
        path: Path,
        document: Mapping[str, Any],
        *,
        experiment: PyTree,
        shardings: list[jax.sharding.Sharding],
        in_step: dict[str, PyTree],
        replicated: jax.sharding.Sharding,
    ) -> "CheckpointState":
        """Read the checkpoint at `path` (`document`: its verified metadata). `experiment`
        (the arrays of the experiment to resume, placed on `shardings`, one per leaf) and
        `in_step` (the initial in-step states) are the templates; the metric accumulators
        come back as a `StoredTree`. A structure that differs raises `ValueError` listing
        the missing, unexpected and mismatched leaves."""
        trees = document["trees"]
        saved = [LeafSpec.from_json(d) for d in trees["experiment"]]
        check_structure(
            saved,
            specs(experiment),
            source=str(path),
            template_name=str(document.get("experiment_type", "the experiment")),
        )
        abstract = {"experiment": abstract_storage(experiment, saved, shardings)}
        acc_saved = [LeafSpec.from_json(d) for d in trees.get("train_accumulators", [])]
        abstract["train_accumulators"] = _replicated(acc_saved, replicated)
        step_saved = [LeafSpec.from_json(d) for d in trees.get("in_step", [])]
        kept, abstract["in_step"] = _in_step_abstract(in_step, step_saved, replicated)
        restored = read_items(path, abstract)
        device = TrainState(
            experiment=from_storage(experiment, saved, restored["experiment"]),
            metrics=StoredTree(acc_saved, restored["train_accumulators"]) if acc_saved else None,
            in_step=_in_step_restored(in_step, kept, step_saved, restored["in_step"]),
        )
        return cls(device, RunRecord.from_document(document))


def _replicated(saved: list[LeafSpec], sharding: jax.sharding.Sharding) -> dict[str, Any]:
    return {
        storage_key(i): jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
        for i, s in enumerate(saved)
    }


def _in_step_abstract(
    in_step: dict[str, PyTree], saved: list[LeafSpec], replicated: jax.sharding.Sharding
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Which in-step states (by callback key) the checkpoint holds with the same structure,
    and what Orbax restores (every saved leaf, placed on `replicated`). A callback whose
    in-step state the checkpoint lacks, or holds with another structure, starts it afresh;
    the others' states are still restored (unless a state left out holds PRNG keys, whose
    stored shape its spec does not tell: then all start afresh)."""
    kept = {}
    for key, state in in_step.items():
        prefix = jax.tree_util.keystr((jax.tree_util.DictKey(key),))
        if specs({key: state}) == [s for s in saved if s.path.startswith(prefix)]:
            kept[key] = state
    if not kept:
        return {}, {}
    ours = abstract_storage(kept, saved, [replicated] * len(specs(kept)))
    abstract: dict[str, Any] = {}
    for i, spec in enumerate(saved):
        name = storage_key(i)
        if name in ours:
            abstract[name] = ours[name]
        elif spec.dtype.startswith("key<"):
            return {}, {}
        else:
            abstract[name] = jax.ShapeDtypeStruct(
                spec.shape, jnp.dtype(spec.dtype), sharding=replicated
            )
    return kept, abstract


def _in_step_restored(
    in_step: dict[str, PyTree],
    kept: dict[str, PyTree],
    saved: list[LeafSpec],
    stored: dict[str, Any],
) -> dict[str, PyTree]:
    """`in_step` with the states of `kept` replaced by the checkpoint's."""
    restored = from_storage(kept, saved, stored) if kept else {}
    return {key: restored.get(key, state) for key, state in in_step.items()}


def read_in_step(
    path: Path,
    document: Mapping[str, Any],
    in_step: dict[str, PyTree],
    replicated: jax.sharding.Sharding,
) -> dict[str, PyTree] | None:
    """The in-step states saved in the training checkpoint at `path` (`document`: its
    verified metadata), like the templates `in_step` and placed on `replicated`; `None` if it
    holds none of that structure (written by `solstice.save`, or by a run whose callbacks
    had other in-step reductions)."""
    saved = [LeafSpec.from_json(d) for d in document.get("trees", {}).get("in_step", [])]
    if not in_step or specs(in_step) != saved:
        return None
    abstract = {"in_step": abstract_storage(in_step, saved, [replicated] * len(saved))}
    return from_storage(in_step, saved, read_items(path, abstract)["in_step"])
