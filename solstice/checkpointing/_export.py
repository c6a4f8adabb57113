"""`solstice.save` / `solstice.load`: share a trained experiment or model outside a run."""

import os
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import equinox as eqx
import jax

from .._version import __version__
from ..storage._paths import check_path, is_remote
from ._format import METADATA_FILE, open_checkpoint
from ._orbax import read, write
from ._remote import RemoteCheckpoints, materialize
from ._tree import (
    LeafSpec,
    abstract_storage,
    check_structure,
    from_storage,
    is_array_like,
    specs,
    to_storage,
)

T = TypeVar("T")


def save(path: str | os.PathLike, tree: Any) -> Path | str:
    """Save the arrays of an experiment, a model or any pytree to a new directory `path`.

    Only arrays are written (with Orbax, no pickle), with a JSON description of each one by
    pytree path and a SHA-256 of every file. Everything that is not an array (the model's
    configuration, activation functions, ...) comes back from the template given to
    `solstice.load`. The write is atomic: `path` appears complete or not at all.

    **Arguments:**

    - `path`: a directory that does not exist yet, or a URL of remote storage
      (`"s3://bucket/models/mlp"`: written locally, then uploaded, `solstice.json` last).
    - `tree`: an `equinox.Module` (e.g. a `solstice.Experiment` or a model) or any pytree.

    **Returns:** `path`, as a `pathlib.Path` (a URL: as given).

    **Example:**

    ```python
    experiment = trainer.fit(experiment, datamodule)
    solstice.save("digits-mlp", experiment.model)
    model = solstice.load("digits-mlp", like=make_model())   # same configuration, any values
    ```
    """
    location = check_path(path, "path")
    if is_remote(location):
        return _save_remote(location, tree)
    path = Path(location).absolute()
    if path.exists():
        raise FileExistsError(
            f"`{path}` already exists; `solstice.save` never overwrites. Remove it or choose "
            "another path."
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"The parent directory of `{path}` does not exist; create it first."
        )
    stored, leaf_specs = to_storage(eqx.filter(tree, eqx.is_array))
    metadata = {
        "kind": "export",
        "type": f"{type(tree).__module__}.{type(tree).__qualname__}",
        "created_unix_ns": time.time_ns(),
        "solstice_version": __version__,
        "trees": {"experiment": leaf_specs},
    }
    write(path, {"experiment": stored}, metadata)
    return path


def _save_remote(url: str, tree: Any) -> str:
    parent, _, name = url.rstrip("/").rpartition("/")
    remote = RemoteCheckpoints(parent)
    if remote.read_text(name, METADATA_FILE) is not None or name in remote.names():
        raise FileExistsError(
            f"`{url}` already exists; `solstice.save` never overwrites. Remove it or choose "
            "another path."
        )
    with tempfile.TemporaryDirectory() as staging:
        local = Path(staging) / name
        save(local, tree)
        remote.publish(local)
    return url


def _placement_of(x: Any) -> jax.sharding.Sharding:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load(path: str | os.PathLike, *, like: T) -> T:
    """Load arrays saved by `solstice.save` (or a `ModelCheckpoint` checkpoint's experiment)
    into a copy of the template `like`.

    The checkpoint is verified first (every file against its recorded SHA-256). The template
    gives the structure and every non-array part; it must have the same arrays by pytree
    path, shape and dtype as what was saved, else a `ValueError` lists the missing,
    unexpected and mismatched leaves. Arrays are placed like the template's (a `jax.Array`
    leaf's sharding, or an abstract leaf's if it has one; else the default device). Numpy
    leaves come back as numpy.

    **Arguments:**

    - `path`: a directory written by `solstice.save`, or a training checkpoint (local, or
      a URL of remote storage: downloaded and verified first).
    - `like`: a template built the same way as what was saved (its values are ignored).
      It may be abstract, e.g. `eqx.filter_eval_shape(make_model, key)`, so that nothing
      is allocated twice.

    **Returns:** a pytree like `like` holding the saved values.

    **Example:**

    ```python
    experiment = solstice.load(checkpoint.best_model_path, like=make_experiment())
    ```
    """
    location = check_path(path, "path")
    path = materialize(location) if is_remote(location) else Path(location)
    document = open_checkpoint(path, hint="")
    saved = [LeafSpec.from_json(d) for d in document["trees"]["experiment"]]
    dyn, static = eqx.partition(like, is_array_like)
    check_structure(saved, specs(dyn), source=str(path), template_name=type(like).__name__)
    shardings = [_placement_of(x) for x in jax.tree.leaves(dyn)]
    restored = read(path, {"experiment": abstract_storage(dyn, saved, shardings)})
    return eqx.combine(from_storage(dyn, saved, restored["experiment"]), static)
