"""The bad-input family, at the bottom of the package.

Everything a user can fix (a file, an option, a folder, the machine's memory) raises an
:class:`InputError` whose message names the file or option, the problem and what to do. The command
line turns it into one line and exit code 2, the napari widget into a notification; any other
exception is a bug (exit code 3, a traceback with ``--debug``).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


class InputError(ValueError):
    """Bad input the user can fix; the message names the file or option, the problem and the fix."""


class ImageError(InputError):
    """A file cannot be used as an image (or a label map, or a points file)."""


class MissingFileError(InputError, FileNotFoundError):
    """A path that does not exist (also a FileNotFoundError, for callers that catch that)."""


class CheckpointError(InputError):
    """A checkpoint that cannot, or must not, be loaded."""


class OutputError(InputError):
    """An output cannot be written (permission, full disk, would overwrite an input)."""


class ResourceError(InputError):
    """A run needs more memory than the machine has, even at the lowest resolution offered."""


def missing(path: str | os.PathLike, what: str = "file or folder") -> MissingFileError:
    return MissingFileError(f"{path}: no such {what}; check the path")


def output_error(e: OSError, path: str | os.PathLike) -> OutputError:
    """An :class:`OutputError` saying why ``path`` could not be written and what to do."""
    p = Path(path)
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        why = "the disk is full (or the quota is used up); free some space or choose another output folder"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system); choose an output folder you can write to"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a part of the path is a file, not a folder; choose another output folder"
    else:
        why = f"{e.strerror or e}; choose another output folder"
    return OutputError(f"cannot write {p}: {why}")
