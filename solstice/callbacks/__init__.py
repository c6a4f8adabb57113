"""Callbacks: objects whose hooks the Trainer calls during a run."""

from ._callback import Callback as Callback
from ._logging import LoggingCallback as LoggingCallback
from ._progress_bar import ProgressBar as ProgressBar
