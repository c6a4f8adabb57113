"""The Trainer and the pieces it is made of (placement, compiled steps, loops)."""

from ._progress import Progress as Progress
from ._sharding_rules import ByPath as ByPath
from ._sharding_rules import FullySharded as FullySharded
from ._trainer import Trainer as Trainer
