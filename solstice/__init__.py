"""Solstice: a Lightning-style trainer for JAX, built on Equinox."""

from . import callbacks as callbacks
from . import datamodules as datamodules
from . import loggers as loggers
from . import tuner as tuner
from ._classification import ClassificationExperiment as ClassificationExperiment
from ._classification_metrics import ClassificationMetrics as ClassificationMetrics
from ._experiment import Experiment as Experiment
from ._in_step import InStep as InStep
from ._in_step import StepData as StepData
from ._loss_scaling import scale_loss as scale_loss
from ._metrics import Metrics as Metrics
from ._optax_optimizer import OptaxOptimizer as OptaxOptimizer
from ._optimizer import Optimizer as Optimizer
from ._optimizer_tap import OptimizerCall as OptimizerCall
from ._population import Population as Population
from ._population_metrics import PopulationMetrics as PopulationMetrics
from ._sgd import SGDOptimizer as SGDOptimizer
from ._step_cost import StepCost as StepCost
from ._version import __version__ as __version__
from .checkpointing import (
    load as load,
)
from .checkpointing import (
    save as save,
)
from .loggers import (
    CSVLogger as CSVLogger,
)
from .loggers import (
    Logger as Logger,
)
from .loggers import (
    MLFlowLogger as MLFlowLogger,
)
from .loggers import (
    PythonLogger as PythonLogger,
)
from .loggers import (
    TensorBoardLogger as TensorBoardLogger,
)
from .loggers import (
    WandBLogger as WandBLogger,
)
from .trainer import ByPath as ByPath
from .trainer import Combined as Combined
from .trainer import FullySharded as FullySharded
from .trainer import ResumeReport as ResumeReport
from .trainer import TensorParallel as TensorParallel
from .trainer import Trainer as Trainer
from .trainer import check_resume as check_resume
