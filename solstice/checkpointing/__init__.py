"""Checkpoints: the on-disk format, export (`save`/`load`, also at `solstice.save` and
`solstice.load`), `verify` of a checkpoint directory and `CheckpointError`. Training
checkpoints are written by `solstice.callbacks.ModelCheckpoint`; `solstice.check_resume`
(in `solstice.trainer`) checks that your run resumes exactly."""

from ._export import load as load
from ._export import save as save
from ._format import CheckpointError as CheckpointError
from ._format import verify as verify
