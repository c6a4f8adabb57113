"""Solstice: a Lightning-style trainer for JAX, built on Equinox."""

from . import callbacks as callbacks, datamodules as datamodules, loggers as loggers
from ._classification import ClassificationExperiment as ClassificationExperiment
from ._classification_metrics import ClassificationMetrics as ClassificationMetrics
from ._experiment import Experiment as Experiment
from ._metrics import Metrics as Metrics
from ._optax_optimizer import OptaxOptimizer as OptaxOptimizer
from ._optimizer import Optimizer as Optimizer
from ._sgd import SGDOptimizer as SGDOptimizer
from .checkpointing import (
    ResumeReport as ResumeReport,
    check_resume as check_resume,
    load as load,
    save as save,
)
from .loggers import (
    CSVLogger as CSVLogger,
    Logger as Logger,
    PythonLogger as PythonLogger,
    TensorBoardLogger as TensorBoardLogger,
    WandBLogger as WandBLogger,
)
from .trainer import Trainer as Trainer

__version__ = "0.1.0"
