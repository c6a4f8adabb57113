"""Checkpoints: the on-disk format, export (`save`/`load`, also at `solstice.save` and
`solstice.load`), `verify` of a checkpoint directory, `CheckpointError` and the exact-resume
check `check_resume`. Training checkpoints are written by `solstice.callbacks.ModelCheckpoint`."""

from ._check_resume import ResumeReport as ResumeReport
from ._check_resume import check_resume as check_resume
from ._export import load as load
from ._export import save as save
from ._format import CheckpointError as CheckpointError
from ._format import verify as verify
