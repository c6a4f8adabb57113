"""Checkpoint format, Orbax I/O, export and the resume check (private; see `solstice.save`,
`solstice.load`, `solstice.check_resume` and `solstice.callbacks.ModelCheckpoint`)."""

from ._check_resume import ResumeReport as ResumeReport
from ._check_resume import check_resume as check_resume
from ._export import load as load
from ._export import save as save
from ._format import CheckpointError as CheckpointError
from ._format import verify as verify
