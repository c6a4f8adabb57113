"""Directories of remote storage (`s3://`, `gs://`, any filesystem fsspec knows), and local
directories mirrored to them.

`fsspec` and the filesystem's own package (`s3fs` for `s3://`, `gcsfs` for `gs://`) are
imported only when a remote path is used (the `remote` extra installs fsspec and s3fs).
"""

import os
import shutil
from pathlib import Path

from ._paths import is_remote, local_cache


class RemoteDir:
    """A directory of remote storage, through fsspec: paths inside it are relative, with
    `/` between parts."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:
            raise ImportError(
                f"`{url}` is remote storage, which needs fsspec: `pip install "
                "'solstice[remote]'` (fsspec and s3fs; `gcsfs` for gs://)."
            ) from None
        self.url = url.rstrip("/")
        try:
            # a filesystem of its own: fsspec's cached instances keep the endpoint and
            # credentials of their creation, which the environment may have changed since
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except ImportError as error:
            raise ImportError(
                f"`{url}`: fsspec needs a package for this filesystem: {error}"
            ) from None

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def names(self) -> list[str]:
        """The names of the subdirectories, sorted."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"
        )

    def files(self) -> list[str]:
        """Every file below the directory, as relative paths."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def read_text(self, *parts: str) -> str | None:
        """A file's text, or `None` if there is no such file."""
        try:
            return self.fs.cat_file(self._path(*parts)).decode()
        except FileNotFoundError:
            return None

    def upload_file(self, local: Path | str, *parts: str) -> None:
        self.fs.put_file(str(local), self._path(*parts))

    def download_file(self, rel: str, local: Path | str) -> None:
        self.fs.get_file(self._path(rel), str(local))

    def download_tree(self, rel: str, local: Path) -> None:
        """The subdirectory `rel`, copied into `local` (created)."""
        local.mkdir(parents=True, exist_ok=True)
        self.fs.get(self._path(rel) + "/", str(local) + "/", recursive=True)

    def delete_file(self, *parts: str) -> None:
        try:
            self.fs.rm_file(self._path(*parts))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel: str) -> None:
        try:
            self.fs.rm(self._path(rel), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()


class Mirror:
    """A local directory that stands for a directory given by the user (`location`): the
    directory itself when local, else a local cache (`local_cache(location, kind)`) that
    `pull` fills from remote storage and `push` copies back (changed files uploaded, files
    gone locally deleted there), so that whoever writes files there needs no remote I/O."""

    def __init__(self, location: str, kind: str):
        self.location = location
        self.remote = RemoteDir(location) if is_remote(location) else None
        self.local = str(local_cache(location, kind)) if self.remote else location
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self) -> None:
        """Replace the local copy with what is on remote storage (nothing when local)."""
        if self.remote is None:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        os.makedirs(self.local, exist_ok=True)
        for rel in self.remote.files():
            target = Path(self.local, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.remote.download_file(rel, target)
            stat = target.stat()
            self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)

    def push(self) -> None:
        """Make remote storage hold what the local copy holds (nothing when local)."""
        if self.remote is None or not os.path.isdir(self.local):
            return
        present: dict[str, tuple[int, int]] = {}
        for path in sorted(Path(self.local).rglob("*")):
            if path.is_file():
                stat = path.stat()
                present[path.relative_to(self.local).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        for rel, signature in present.items():
            if self._pushed.get(rel) != signature:
                self.remote.upload_file(Path(self.local, rel), rel)
        for rel in set(self._pushed) - set(present):
            self.remote.delete_file(rel)
        self._pushed = present
