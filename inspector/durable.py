"""Renames that survive a power cut: the data reaches the disk before the rename, the rename before we go on.

A rename alone is atomic for readers but not durable: after a crash the new name can point at an empty file, or the
rename itself can be lost. Every atomic write (bundles, manifests, checkpoints, the registry cache, exported models)
therefore fsyncs what it wrote, renames, then fsyncs the folder that holds the new name.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    path = Path(path)
    if path.is_dir():
        if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals its entries
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and every folder, deepest first (a bundle before it is renamed into place)."""
    root = Path(root)
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(root)


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """``os.replace(src, dst)`` with ``src``'s data flushed first and the rename itself flushed after."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        fsync_tree(src)
    else:
        fsync_path(src)
    os.replace(src, dst)
    fsync_path(dst.parent)
