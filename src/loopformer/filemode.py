"""File modes as the user's umask asks: temp files and folders (0600 / 0700 from :mod:`tempfile`) that are renamed
into place get the mode an ordinary ``open`` / ``mkdir`` would have given them."""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's current umask (set back at once: reading it means setting it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_created(path: Path | str | int, directory: bool = False) -> None:
    """Give ``path`` (or an open file descriptor) the mode a new file (0666) or folder (0777) gets under the umask."""
    mode = (0o777 if directory else 0o666) & ~umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def tree_as_created(folder: Path) -> None:
    """:func:`as_created` for ``folder`` and everything in it (safetensors writes its files 0600, tempfile 0700)."""
    as_created(folder, directory=True)
    for path in Path(folder).rglob("*"):
        if not path.is_symlink():
            as_created(path, directory=path.is_dir())
