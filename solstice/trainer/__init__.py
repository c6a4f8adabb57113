"""The Trainer and the pieces it is made of (placement, compiled steps, loops)."""

from .._progress import Progress as Progress
from ._check_resume import ResumeReport as ResumeReport
from ._check_resume import check_resume as check_resume
from ._sharding_rules import ByPath as ByPath
from ._sharding_rules import Combined as Combined
from ._sharding_rules import FullySharded as FullySharded
from ._sharding_rules import TreeRule as TreeRule
from ._tensor_parallel import TensorParallel as TensorParallel
from ._trainer import Trainer as Trainer
