"""The on-disk format: `solstice.json` (metadata and checksums) and how a checkpoint is judged.

A checkpoint is a directory:

```
epoch=3-step=400/
  experiment/            the experiment's arrays (an Orbax PyTree checkpoint)
  train_accumulators/    mid-epoch checkpoints only: the on-device metric accumulators
  solstice.json          metadata (JSON, no pickle) + a SHA-256 of every other file
  _CHECKPOINT_METADATA   Orbax's bookkeeping
  commit_success.txt     Orbax's commit marker
```

Orbax writes everything into `<name>.orbax-checkpoint-tmp` and renames it to `<name>` as its
last act, so a directory with the final name is complete; `solstice.json` is written inside the
temporary directory just before that rename. A directory is a valid checkpoint only if it has
its final name, Orbax's commit marker, a parseable `solstice.json` whose own checksum matches,
and every file listed there with the recorded size and SHA-256. Anything else is reported,
never loaded, and left on disk untouched.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "solstice.checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "solstice.json"
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a save in progress
ORBAX_COMMIT_FILE = "commit_success.txt"
ORBAX_STEP_FILE = "_CHECKPOINT_METADATA"
DELETING_SUFFIX = ".solstice-deleting"  # a checkpoint being removed by retention
HISTORY_FILE = "history.jsonl"  # the run's metric history, beside its checkpoints
# Files at the top level that Orbax may still touch after `solstice.json` is written.
_UNHASHED = frozenset({METADATA_FILE, ORBAX_COMMIT_FILE, ORBAX_STEP_FILE})
_CHUNK = 1 << 20
# The names `ModelCheckpoint` gives its checkpoints: a directory so named is a checkpoint,
# even emptied (then it is reported as damaged, not ignored).
CHECKPOINT_NAME = re.compile(r"epoch=\d+-step=\d+(-v\d+)?")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used: incomplete, corrupted or incompatible."""


def is_partial(path: Path) -> bool:
    """Whether `path` is an unfinished save (Orbax's temporary directory) or a checkpoint
    being deleted."""
    return ORBAX_TMP_SUFFIX in path.name or path.name.endswith(DELETING_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """`{relative/path: {"size": bytes, "sha256": hex}}` for every file of a checkpoint."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            rel = full.relative_to(directory).as_posix()
            if rel in _UNHASHED:
                continue
            out[rel] = {"size": full.stat().st_size, "sha256": _sha256(full)}
    return out


def _canonical(document: dict[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _self_checksum(document: dict[str, Any]) -> str:
    body = {k: v for k, v in document.items() if k != "checksum"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Write `solstice.json` into `directory` (after the arrays): the metadata, a checksum of
    every file, and a checksum of the document itself."""
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **metadata,
        "files": file_checksums(directory),
    }
    document["checksum"] = _self_checksum(document)
    tmp = directory / (METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(document, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / METADATA_FILE)


def read_metadata(directory: Path) -> dict[str, Any]:
    """Parse and check `solstice.json` (not the other files: see `verify`).

    Raises `CheckpointError` saying what is wrong.
    """
    path = Path(directory) / METADATA_FILE
    if is_partial(Path(directory)):
        raise CheckpointError(f"`{directory}` is an unfinished save (Orbax temporary directory).")
    try:
        text = path.read_text()
    except FileNotFoundError:
        empty = Path(directory).is_dir() and not any(Path(directory).iterdir())
        raise CheckpointError(
            f"`{path}` is missing"
            + (" (the checkpoint directory is empty)" if empty else "")
            + ": the save never completed, the files were removed, or this is not a Solstice "
            "checkpoint."
        ) from None
    except (OSError, UnicodeDecodeError) as error:  # e.g. a directory in its place
        raise CheckpointError(
            f"`{path}` cannot be read as a file ({type(error).__name__}: {error})."
        ) from None
    return parse_metadata(text, str(path))


def parse_metadata(text: str, where: str) -> dict[str, Any]:
    """`solstice.json`'s text (read from `where`) as a checked document; raises
    `CheckpointError` saying what is wrong."""
    path = where
    try:
        document = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"`{path}` is not valid JSON (truncated?): {error}.") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"`{path}` is not Solstice checkpoint metadata.")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"`{path}` has format version {version!r}; this Solstice reads versions up to "
            f"{FORMAT_VERSION}. Upgrade Solstice to read it."
        )
    if document.get("checksum") != _self_checksum(document):
        raise CheckpointError(f"`{path}` does not match its own checksum (corrupted).")
    return document


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a whole checkpoint and return its metadata.

    Raises `CheckpointError` if it is unfinished, has no commit marker, or any file is
    missing, has another size, or another SHA-256 than recorded at save time.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"`{directory}` is not a directory.")
    document = read_metadata(directory)
    for orbax_file in (ORBAX_COMMIT_FILE, ORBAX_STEP_FILE):
        if not (directory / orbax_file).is_file():
            raise CheckpointError(f"`{directory}` lacks Orbax's `{orbax_file}`.")
    files = document.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"`{directory}`: `{METADATA_FILE}` lists no files.")
    for rel, expected in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"`{directory}`: file `{rel}` is missing.")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"`{directory}`: file `{rel}` has {size} bytes, {expected['size']} were "
                "written (truncated or corrupted)."
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"`{directory}`: file `{rel}` fails its SHA-256 check.")
    return document


def candidates(dirpath: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The subdirectories of `dirpath` that look like checkpoints, and the unfinished saves.

    A directory looks like a checkpoint when it has a `solstice.json` or Orbax's top-level
    `_CHECKPOINT_METADATA`, or the name `ModelCheckpoint` gives checkpoints (so a checkpoint
    whose metadata was damaged, or that was emptied, is still found, and reported).
    """
    dirpath = Path(dirpath)
    found: list[Path] = []
    partial: list[Path] = []
    if not dirpath.is_dir():
        return found, partial
    for child in sorted(dirpath.iterdir()):
        if not child.is_dir():
            continue
        if is_partial(child):
            partial.append(child)
        elif (
            CHECKPOINT_NAME.fullmatch(child.name)
            or (child / METADATA_FILE).exists()
            or (child / ORBAX_STEP_FILE).exists()
        ):
            found.append(child)
    return found, partial


def open_checkpoint(path: str | os.PathLike, *, hint: str) -> dict[str, Any]:
    """Verify the single checkpoint at `path` and return its metadata document.

    Raises `FileNotFoundError` if nothing is there, and `CheckpointError` if it does not
    verify; when `path` is a *directory of* checkpoints, the error names one of them and
    adds `hint` (what the caller can pass instead).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at `{path}`.")
    try:
        return verify(path)
    except CheckpointError:
        found, _ = candidates(path)
        if found and not (path / METADATA_FILE).exists():
            raise CheckpointError(
                f"`{path}` is a directory of checkpoints, not a checkpoint; pass one of them "
                f"(e.g. `{found[-1]}`){hint}."
            ) from None
        raise
