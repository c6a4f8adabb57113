"""Where a run's files live: local paths, URLs of remote storage (`s3://`, `gs://`, any
fsspec filesystem) and the local copies that stand for them. The lowest layer: it imports
nothing else of Solstice."""

from ._paths import check_path as check_path
from ._paths import is_remote as is_remote
from ._paths import local_cache as local_cache
from ._paths import url_join as url_join
from ._remote import Mirror as Mirror
from ._remote import RemoteDir as RemoteDir
