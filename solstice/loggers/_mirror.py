"""A file logger's directory: local, or a URL of remote storage written through a local copy."""

import os

import jax

from ..storage import Mirror, check_path


def mirror_of(log_dir: str | os.PathLike, what: str) -> Mirror:
    """The `Mirror` a file logger writes into: `log_dir` itself when local; for a URL a local
    copy, filled from remote storage first (by process 0, the one that writes: a resumed
    logger continues the files there) and uploaded at every `flush`."""
    mirror = Mirror(check_path(log_dir, what), "logs")
    if jax.process_index() == 0:
        mirror.pull()
    return mirror
