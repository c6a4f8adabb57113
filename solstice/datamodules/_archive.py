"""Safe extraction of downloaded tar archives.

Every member is checked before anything is written: absolute paths, `..` components,
links that point outside the destination, and device files or FIFOs are refused with a
`ValueError` naming the member. Files are extracted into a temporary folder beside the
destination and moved into place one by one with `os.replace`.
"""

import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from typing import Any


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (parts and ":" in parts[0]):
        raise ValueError(
            f"Refusing to extract {archive!r}: member {name!r} has an absolute path. "
            "The archive is not the expected dataset file; delete it."
        )
    if ".." in parts:
        raise ValueError(
            f"Refusing to extract {archive!r}: member {name!r} contains '..' and would be "
            "written outside the destination. Delete the archive."
        )
    if member.issym() or member.islnk():
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
            raise ValueError(
                f"Refusing to extract {archive!r}: link {name!r} -> {target!r} points outside "
                "the destination. Delete the archive."
            )
    elif not (member.isfile() or member.isdir()):
        raise ValueError(
            f"Refusing to extract {archive!r}: member {name!r} is a device file or FIFO, "
            "which no dataset archive contains. Delete the archive."
        )


def safe_extract(
    archive: str | os.PathLike, dest: str | os.PathLike, members: Iterable[str] | None = None
) -> list[str]:
    """Extract the regular files of a tar archive (any compression) into `dest`.

    **Arguments:**

    - `archive`: the tar file.
    - `dest`: the destination folder (created if needed).
    - `members`: if given, only these member names are extracted; each must be present.

    **Returns:** the paths of the extracted files.
    """
    archive, dest = os.fspath(archive), os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        infos = tar.getmembers()
        for info in infos:
            _check_member(info, archive)
        files = [i for i in infos if i.isfile()]
        if members is not None:
            wanted = set(members)
            files = [i for i in files if i.name in wanted]
            missing = wanted - {i.name for i in files}
            if missing:
                raise ValueError(
                    f"{archive!r} lacks the expected members {sorted(missing)}; it is not the "
                    "expected dataset archive. Delete it and download it again."
                )
        tmp = tempfile.mkdtemp(dir=dest, prefix=".extract-")
        try:
            kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=files, **kwargs)
            placed = []
            for info in files:
                target = os.path.join(dest, *info.name.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(tmp, *info.name.split("/")), target)
                placed.append(target)
            return placed
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
