"""Callbacks: objects whose hooks the Trainer calls during a run."""

from ._callback import Callback as Callback
from ._device_stats import DeviceStatsMonitor as DeviceStatsMonitor
from ._early_stopping import EarlyStopping as EarlyStopping
from ._logging import LoggingCallback as LoggingCallback
from ._lr_monitor import LearningRateMonitor as LearningRateMonitor
from ._model_checkpoint import ModelCheckpoint as ModelCheckpoint
from ._model_summary import ModelSummary as ModelSummary
from ._norm_monitor import NormMonitor as NormMonitor
from ._on_exception_checkpoint import OnExceptionCheckpoint as OnExceptionCheckpoint
from ._population_checkpoint import PopulationCheckpoint as PopulationCheckpoint
from ._population_early_stopping import PopulationEarlyStopping as PopulationEarlyStopping
from ._profiler import ProfilerCallback as ProfilerCallback
from ._profiler import Trace as Trace
from ._progress_bar import ProgressBar as ProgressBar
from ._terminate_on_nan import TerminateOnNaN as TerminateOnNaN
from ._throughput import ThroughputMonitor as ThroughputMonitor
from ._timer import Timer as Timer
from ._weight_averaging import EMAWeightAveraging as EMAWeightAveraging
from ._weight_averaging import StochasticWeightAveraging as StochasticWeightAveraging
from ._weight_averaging import WeightAveraging as WeightAveraging
