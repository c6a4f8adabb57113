"""The one error every logger raises when it is used after `close()`."""

from ._logger import Logger


def check_open(logger: Logger, closed: bool, action: str = "log") -> None:
    """Raise `RuntimeError` naming `logger` if it has been closed."""
    if closed:
        raise RuntimeError(
            f"Cannot {action} to {logger!r}: it was closed. A closed logger has flushed and "
            "released its files or run; create a new logger to record more."
        )
