"""Orbax I/O: asynchronous atomic writes of array items plus `solstice.json`, and restores.

Orbax is imported here only, when a checkpoint is first written or read, so `import solstice`
stays light.
"""

import itertools
import threading
from pathlib import Path
from typing import Any

import jax

from ._format import ORBAX_TMP_SUFFIX, write_metadata


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Checkpoints are written with Orbax, which is not installed. Install it with "
            "`pip install 'solstice[checkpoint]'`."
        ) from error
    return ocp


# Numbers the writers' Orbax checkpointers, for their barrier names (see `CheckpointWriter._get`).
_WRITER_IDS = itertools.count()


class CheckpointWriter:
    """Writes Solstice checkpoints with one Orbax `AsyncCheckpointer`, one save at a time.

    `save` returns once every array has been copied to host memory (Orbax does this copy
    synchronously, so the arrays may be donated to the next step right away); that copy is
    all the training thread waits for. On Orbax's background thread the arrays are written
    into `<path>.orbax-checkpoint-tmp`, `solstice.json` (metadata and checksums) is added, and
    the directory is renamed to `<path>`: the commit. `wait()` blocks until then.

    **Example:**

    ```python
    writer = CheckpointWriter()
    writer.save(path, {"experiment": arrays}, metadata)
    error = writer.wait()   # None, or the exception of a failed save
    ```
    """

    def __init__(self) -> None:
        self._checkpointer: Any = None
        self._lock = threading.Lock()
        self._job: tuple[Path, dict[str, Any]] | None = None
        self.pending: Path | None = None

    def _get(self) -> Any:
        if self._checkpointer is None:
            ocp = _orbax()
            # With several processes, Orbax's background thread meets the other processes at
            # barriers named after the checkpoint's directory name alone
            # (`async_write_complete.epoch=0-step=7`). Two writers committing saves of the same
            # name at once (two `ModelCheckpoint`s with different `dirpath`s, saving on the
            # same step) would wait at one barrier: the coordination service fails the second
            # ("Barrier ... is already ongoing") and the processes hang until Orbax's timeout.
            # A prefix per writer keeps their barriers apart. Every process creates its writers
            # in the same order (saving is collective: all processes save, in the same order),
            # so the n-th writer has the same prefix in every process (Orbax's first barrier
            # of a save, by default `sync_global_devices`, fails if the names differ).
            options = ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=f"solstice_writer{next(_WRITER_IDS)}"
            )
            self._checkpointer = ocp.AsyncCheckpointer(
                ocp.CompositeCheckpointHandler(),
                async_options=ocp.AsyncOptions(post_finalization_callback=self._finalize),
                multiprocessing_options=options,
            )
        return self._checkpointer

    def save(self, path: Path, items: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> None:
        """Start writing `items` (name -> flat dict of arrays) and `metadata` to `path`."""
        if self.pending is not None:
            raise RuntimeError("A save is still in progress; call `wait()` first.")
        ocp = _orbax()
        checkpointer = self._get()
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in items.items() if tree}
        )
        with self._lock:
            self._job = (Path(path), metadata)
        self.pending = Path(path)
        try:
            checkpointer.save(Path(path), args=args)
        except BaseException:
            self.pending = None
            raise

    def _finalize(self) -> None:
        """Orbax's background thread, after the arrays are written, before the rename."""
        if jax.process_index() != 0:
            return
        with self._lock:
            assert self._job is not None
            final, metadata = self._job
        tmp = final.parent / (final.name + ORBAX_TMP_SUFFIX)
        write_metadata(tmp if tmp.is_dir() else final, metadata)

    def wait(self) -> Exception | None:
        """Block until the save in progress is committed; return its error, if it failed."""
        if self.pending is None:
            return None
        self.pending = None
        try:
            self._checkpointer.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - reported by the caller
            return error
        return None


def write(path: Path, items: dict[str, dict[str, Any]], metadata: dict[str, Any]) -> None:
    """Write a checkpoint and wait for its commit (raise if it fails)."""
    writer = CheckpointWriter()
    writer.save(path, items, metadata)
    error = writer.wait()
    if error is not None:
        raise error


def read(path: Path, abstract: dict[str, dict[str, jax.ShapeDtypeStruct]]) -> dict[str, Any]:
    """Restore the named items of a checkpoint as `abstract` describes them (shapes, dtypes
    and shardings: a checkpoint written on N devices is placed on whatever devices
    `abstract` names)."""
    wanted = {name: tree for name, tree in abstract.items() if tree}
    if not wanted:
        return {name: {} for name in abstract}
    ocp = _orbax()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        restored = checkpointer.restore(
            Path(path),
            args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(tree) for name, tree in wanted.items()}
            ),
        )
    finally:
        checkpointer.close()
    return {name: restored[name] if name in wanted else {} for name in abstract}
