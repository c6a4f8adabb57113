"""Checkpoints on remote storage (`s3://`, `gs://`, any filesystem fsspec knows).

Object stores have no atomic rename, and Orbax writes arrays through TensorStore only to
local disks and GCS. So a checkpoint for a remote directory is written exactly as a local one,
into a *staging* directory on this machine (`staging_dir`), and, once committed there,
*published*: every file is uploaded, and `solstice.json` last. `solstice.json` lists the size
and SHA-256 of every other file, so it is the commit marker: a checkpoint whose upload was cut
short has none (an unfinished upload, removed when the next run starts) and one whose files
were damaged afterwards fails its checksums and is reported and skipped, exactly as on a local
disk. Retention deletes `solstice.json` first, so a checkpoint stops being valid at once. To
read a remote checkpoint, it is downloaded into the staging directory and verified there.

The storage itself (fsspec) is `solstice.storage.RemoteDir`; this module knows checkpoints.
"""

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..storage._paths import local_cache, url_join
from ..storage._remote import RemoteDir
from ._find import first_valid
from ._format import (
    CHECKPOINT_NAME,
    METADATA_FILE,
    CheckpointError,
    parse_metadata,
    verify,
)

log = logging.getLogger("solstice")


def staging_dir(url: str) -> Path:
    """Where the checkpoints of the remote directory `url` are written before they are
    uploaded, and downloaded to be read: `$SOLSTICE_STAGING_DIR` (default
    `~/.cache/solstice/staging`) / a hash of `url`."""
    return local_cache(url, "staging")


class RemoteCheckpoints(RemoteDir):
    """A directory of checkpoints on remote storage."""

    def publish(self, checkpoint: Path) -> None:
        """Upload a committed local checkpoint under its name: every file, `solstice.json`
        last (the commit marker)."""
        files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
        for path in files:
            if path.name != METADATA_FILE or path.parent != checkpoint:
                self.upload_file(path, checkpoint.name, path.relative_to(checkpoint).as_posix())
        self.upload_file(checkpoint / METADATA_FILE, checkpoint.name, METADATA_FILE)
        self.fs.invalidate_cache()

    def download(self, name: str, local: Path) -> Path:
        """The checkpoint `name`, downloaded to `local` (replacing what is there, unless it
        is a valid copy of the same checkpoint: the same `solstice.json`, every file
        matching its checksum; a run killed while it removed its staged copy leaves a
        partial one)."""
        remote_meta = self.read_text(name, METADATA_FILE)
        local_meta = local / METADATA_FILE
        if (
            remote_meta is not None
            and local_meta.is_file()
            and local_meta.read_text() == remote_meta
        ):
            try:
                verify(local)
                return local
            except CheckpointError:
                pass
        shutil.rmtree(local, ignore_errors=True)
        self.download_tree(name, local)
        return local

    def delete(self, name: str) -> None:
        """Remove the checkpoint `name`: `solstice.json` first (it is invalid from then on)."""
        self.delete_file(name, METADATA_FILE)
        self.delete_tree(name)

    # ------------------------------------------------------------------ finding
    def documents(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The checkpoints here: `{name: solstice.json}` of those that have a readable one
        (damaged ones are reported), and the names of unfinished uploads (none)."""
        documents: dict[str, dict[str, Any]] = {}
        unfinished: list[str] = []
        for name in self.names():
            if not CHECKPOINT_NAME.fullmatch(name):
                continue
            text = self.read_text(name, METADATA_FILE)
            if text is None:
                unfinished.append(name)
                continue
            try:
                documents[name] = parse_metadata(text, url_join(self.url, name, METADATA_FILE))
            except CheckpointError as error:
                warnings.warn(
                    f"Skipping checkpoint `{url_join(self.url, name)}`: {error} It is left "
                    "untouched.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if unfinished:
            log.info("Ignoring unfinished uploads in %s: %s", self.url, unfinished)
        return documents, unfinished

    def first_valid(self, names: list[str], staging: Path, why: str) -> tuple[Path, dict] | None:
        """Download and verify `names` in turn; the first valid training checkpoint (its
        local copy and metadata). A damaged one is reported and skipped."""
        return first_valid(
            names,
            why,
            fetch=lambda name: self.download(name, staging / name),
            shown=lambda name: url_join(self.url, name),
        )

    def find_last(self, staging: Path) -> tuple[Path, dict[str, Any]] | None:
        """The newest valid training checkpoint (downloaded into `staging`), or `None` if
        there is none at all (unfinished uploads do not count)."""
        documents, _ = self.documents()
        if not documents:
            return None
        order = sorted(documents, key=lambda n: documents[n].get("created_unix_ns", 0))
        found = self.first_valid(order[::-1], staging, "previous")
        if found is None:
            raise CheckpointError(
                f"None of the {len(documents)} checkpoint(s) in `{self.url}` is valid (see the "
                "warnings above); they are left untouched. Pass `ckpt_path=` to one you trust "
                "or move them away to start afresh."
            )
        return found

    def find_best(self, staging: Path, monitor: str, mode: str) -> tuple[Path, dict] | None:
        """The valid checkpoint with the best `monitor` score (downloaded into `staging`)."""
        documents, _ = self.documents()
        scored = []
        for name, document in documents.items():
            info = document.get("checkpoint") or {}
            score = info.get("score")
            if info.get("monitor") == monitor and isinstance(score, int | float):
                scored.append((score, document.get("created_unix_ns", 0), name))
        sign = 1 if mode == "max" else -1
        scored.sort(key=lambda t: (sign * t[0], t[1]), reverse=True)
        return self.first_valid([n for _, _, n in scored], staging, "next best")


def materialize(url: str) -> Path:
    """A local, downloaded copy of the remote checkpoint `url` (for `solstice.load` and
    `ckpt_path=<url>`)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"`{url}` names no checkpoint directory.")
    remote = RemoteCheckpoints(parent)
    if remote.read_text(name, METADATA_FILE) is None and name not in remote.names():
        raise FileNotFoundError(f"No checkpoint at `{url}`.")
    return remote.download(name, staging_dir(parent) / name)
