"""The package version (its own module, so that submodules can read it at import time)."""

__version__ = "0.1.0"
