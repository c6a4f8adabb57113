"""The persistent compilation cache: compiled steps are reused across runs and processes."""

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/solstice/jax` (default `~/.cache/solstice/jax`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "solstice" / "jax"


def enable_compilation_cache(setting: "bool | str | os.PathLike[str]") -> Path | None:
    """Turn on JAX's persistent compilation cache unless the user configured one already.

    **Arguments:**

    - `setting`: `True` for the per-user default directory, a path for another one, `False`
      to leave JAX's configuration alone.

    **Returns:** the cache directory in use, or `None` if caching is off.
    """
    if setting is False:
        return None
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if current and setting is True:
        return Path(current)  # the user's own choice wins
    path = default_cache_dir() if setting is True else Path(setting)
    path.mkdir(parents=True, exist_ok=True)
    if current != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        # JAX opens its cache once per process; make it reopen at the new directory.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    # Cache every compiled function, however quick (JAX's default skips those under 1 s):
    # a second run of the same script then compiles nothing at all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
