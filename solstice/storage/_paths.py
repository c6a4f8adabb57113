"""Paths a user gives Solstice: local directories, or URLs of remote storage (`s3://`,
`gs://`, any filesystem fsspec knows), and the one mistake that silently turns the second into
the first (`pathlib.Path("gs://bucket/run")` is `gs:/bucket/run`, a local directory `gs:`)."""

import hashlib
import os
import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# A URL scheme followed by one slash only: what `pathlib` and `os.path.normpath` make of a URL.
_MANGLED = re.compile(r"^(gs|gcs|s3|s3a|az|abfs|abfss|adl|hdfs|http|https|memory|oss|r2|b2):/(?!/)")


def is_remote(path: Any) -> bool:
    """Whether `path` is a URL of remote storage (`file://` is local)."""
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith("file://")


def check_path(value: Any, what: str) -> str:
    """`value` as a string: a local path or a storage URL. Raises `TypeError` for anything
    that is not a path, and `ValueError` for a URL that lost a slash (which would be created
    as a local directory named after its scheme)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"`{what}` must be a path or a storage URL, got {value!r}.")
    text = os.fspath(value)
    if isinstance(text, bytes):
        text = text.decode()
    match = _MANGLED.match(text)
    if match:
        scheme = match.group(1)
        fixed = f"{scheme}://" + text[len(scheme) + 2 :]
        raise ValueError(
            f"`{what}` got {text!r}, which looks like a storage URL with one slash after `{scheme}:` "
            f"(what `pathlib.Path('{fixed}')` turns it into); used as it is, it would be a "
            f"local directory named `{scheme}:`. Pass the URL as a string: `{fixed!r}`. (For "
            f"a local directory really named `{scheme}:`, write `./{text}`.)"
        )
    if text.startswith("file://"):
        return text[len("file://") :]
    return text


def local_cache(url: str, kind: str) -> Path:
    """The directory on this machine that stands for the remote directory `url`: where
    `kind` (`"staging"` for checkpoints, `"datasets"`) are written before they are uploaded,
    or kept once downloaded. `$SOLSTICE_CACHE_DIR/<kind>/<hash of url>`, by default under
    `~/.cache/solstice` (`$SOLSTICE_STAGING_DIR` overrides the staging directory)."""
    root = os.environ.get("SOLSTICE_CACHE_DIR") or Path.home() / ".cache/solstice"
    if kind == "staging" and os.environ.get("SOLSTICE_STAGING_DIR"):
        root, kind = os.environ["SOLSTICE_STAGING_DIR"], ""
    return Path(root) / kind / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def url_join(url: str, *parts: str) -> str:
    """`url` with `parts` appended, one slash between each."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])
