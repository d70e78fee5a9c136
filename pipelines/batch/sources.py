"""What a batch scores: folders, a dataset manifest, or list files of paths, as one de-duplicated ordered list.

``SOURCE`` items are read as follows:

- a folder: scanned recursively for image suffixes (the line's own scan, :func:`inspector.cli.expand_paths`; what it
  leaves out is reported, never dropped silently);
- a ``.json`` file: a dataset manifest (:mod:`pipelines.data.manifest`), its entries' paths in order;
- a ``.txt``/``.lst``/``.list`` file: one path per line (blank lines and ``#`` comments ignored; a relative path is
  relative to the list file). Listed paths are not checked here: one that cannot be read becomes a row with its
  error, as any bad image does;
- an image file, or a glob.

Paths are made absolute (``..`` folded, links not resolved) so a run restarted from another directory plans the same
shards. A path given twice is scored once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inspector.cli import expand_paths

LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
MANIFEST_SUFFIXES = frozenset({".json"})


@dataclass(frozen=True)
class SourceScan:
    """The images to score in order, the items that matched nothing, and the files left out of folder scans."""

    paths: list[str]
    missing: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_list_file(path: Path) -> list[str]:
    """The paths a list file names, one a line, relative ones taken from the list file's folder."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        p = Path(item)
        out.append(str(p if p.is_absolute() else path.parent / p))
    return out


def read_manifest_paths(path: Path) -> list[str]:
    """The entries' paths of a dataset manifest (``pipelines.data.manifest``), in its order."""
    from pipelines.data.manifest import read_manifest

    try:
        return [entry.path for entry in read_manifest(path).entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a dataset manifest ({exc})") from None


def absolute(path: str) -> str:
    """Absolute, with ``..`` folded lexically (links are not resolved: the path stays the one the user gave)."""
    return os.path.normpath(Path(path).expanduser().absolute())


def collect_images(items: Sequence[str]) -> SourceScan:
    """Every image the ``SOURCE`` items name, absolute and de-duplicated in first-seen order."""
    paths: list[str] = []
    missing: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in items:
        p = Path(item)
        suffix = p.suffix.lower()
        if p.is_file() and suffix in LIST_SUFFIXES:
            paths.extend(read_list_file(p))
        elif p.is_file() and suffix in MANIFEST_SUFFIXES:
            paths.extend(read_manifest_paths(p))
        else:
            scan = expand_paths([item])
            paths.extend(str(f) for f in scan.found)
            missing.extend(scan.missing)
            skipped.extend((str(f), why) for f, why in scan.skipped)
    return SourceScan(list(dict.fromkeys(absolute(p) for p in paths)), missing, skipped)
