"""Writing files as the user expects them: with the modes their umask gives.

Some writers create private files whatever the umask (``safetensors.save_file`` writes 0600,
``tempfile.mkstemp`` / ``mkdtemp`` make 0600 / 0700), so adapters, merged models and logs came
out unreadable to the user's group. Every writer that uses them calls :func:`apply_umask` on what
it wrote, giving files ``0o666 & ~umask`` and folders ``0o777 & ~umask``, as ``open`` and ``mkdir``
would have.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything below it) the umask's default modes."""
    path = Path(path)
    umask = current_umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
        os.chmod(path, 0o777 & ~umask)
    else:
        os.chmod(path, 0o666 & ~umask)


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` with the umask's file mode."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    apply_umask(path)


def fsync_tree(path: str | Path) -> None:
    """Flush every file below ``path`` (and the folders themselves) to the disk, so a rename
    that follows publishes complete data even across a power loss."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def describe_os_error(err: OSError) -> str:
    """'the disk is full (No space left on device)' and the like, for one-line messages."""
    import errno

    known = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied"}
    reason = err.strerror or str(err)
    return f"{known[err.errno]} ({reason})" if err.errno in known else reason


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or one in its cause / context chain), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
