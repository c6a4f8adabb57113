"""Loggers: where published metrics go."""

from ._async import AsyncLogger as AsyncLogger
from ._convert import to_floats as to_floats
from ._csv import CSVLogger as CSVLogger
from ._failures import LoggerFailure as LoggerFailure
from ._fanout import FanoutLogger as FanoutLogger
from ._history import History as History
from ._logger import Logger as Logger
from ._media import Histogram as Histogram
from ._media import histogram as histogram
from ._media import to_host_arrays as to_host_arrays
from ._media import to_host_images as to_host_images
from ._mlflow import MLFlowLogger as MLFlowLogger
from ._python import PythonLogger as PythonLogger
from ._tensorboard import TensorBoardLogger as TensorBoardLogger
from ._wandb import WandBLogger as WandBLogger
