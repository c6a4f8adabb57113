"""Downloading dataset files: mirrors in order, hash verification, atomic placement.

A file is streamed into a temporary file next to its destination, its hash is checked, and
only then is it moved into place with `os.replace` (atomic on one filesystem). An
interrupted or corrupt download never leaves a file under the final name, and several
processes downloading the same file at once are safe.
"""

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import BinaryIO

from ..storage._paths import is_remote

_CHUNK = 1 << 20


def fetch_url(url: str, out: BinaryIO, *, timeout: float = 60.0) -> None:
    """Stream the body of `url` into the open binary file `out`: an `http(s)://` address,
    or a file on remote storage (`s3://`, `gs://`, ... through fsspec: a dataset directory
    there is a mirror).

    The one function that touches the network (tests replace it).
    """
    if is_remote(url) and not url.startswith(("http://", "https://")):
        import fsspec

        with fsspec.open(url, "rb") as source:
            shutil.copyfileobj(source, out, _CHUNK)
        return
    request = urllib.request.Request(url, headers={"User-Agent": "solstice"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        shutil.copyfileobj(response, out, _CHUNK)


def file_hash(path: str | os.PathLike, algorithm: str = "md5") -> str:
    """The hex digest of the file at `path` (`algorithm`: any `hashlib` name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_hash(known_hash: str) -> tuple[str, str]:
    algorithm, sep, value = known_hash.partition(":")
    if not sep or algorithm not in hashlib.algorithms_available or not value:
        raise ValueError(
            f"A known hash must look like 'md5:<hex>' or 'sha256:<hex>', got {known_hash!r}."
        )
    return algorithm, value.lower()


def download(urls: Sequence[str], dest: str | os.PathLike, known_hash: str) -> str:
    """Download a file, trying each of `urls` in order, and place it at `dest` atomically.

    **Arguments:**

    - `urls`: the file's address on each mirror.
    - `dest`: the final path; its folder is created if needed.
    - `known_hash`: `"<algorithm>:<hex digest>"`, e.g. `"md5:f68b3c..."`.

    **Returns:** `dest` as a string.

    **Raises:** `ValueError` if a downloaded file's hash differs from `known_hash` (nothing is
    left at `dest`); `ConnectionError` if no mirror could be reached, listing each error.
    """
    algorithm, expected = _parse_hash(known_hash)
    dest = os.fspath(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".part")
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    fetch_url(url, out)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {e}")
                continue
            actual = file_hash(tmp, algorithm)
            if actual != expected:
                raise ValueError(
                    f"The file downloaded from {url} for {dest!r} has {algorithm} {actual}, "
                    f"expected {expected}. The download is corrupt or the mirror serves a "
                    "different file; nothing was saved. Try again later, or download the file "
                    "yourself, check its hash and put it at that path."
                )
            os.replace(tmp, dest)
            return dest
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise ConnectionError(
        f"Could not download {os.path.basename(dest)!r} from any mirror:\n  " + "\n  ".join(errors)
    )
