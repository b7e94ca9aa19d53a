"""Fingerprints of the source files of a prepared tfds dataset, to detect a stale cache.

tfds reuses a prepared dataset whenever its folder exists, even when the files it was
built from have changed since. The builders here store, in the dataset's metadata
(``metadata.json``, written by tfds together with the records), a fingerprint of every
source file they read: its name relative to the source folder, its size, its
modification time and a SHA-256 of its first bytes (the ``.npy`` header and the first
rows, the JSON's start, the image header). ``build_*`` compares the stored fingerprint
with the files on disk and deletes the prepared dataset when they differ, so that it is
built again.

The fingerprint does not hash whole files (the COCO features are gigabytes): a change
that keeps a file's size, its modification time and its first bytes goes unnoticed.
Copying the sources without keeping modification times triggers a rebuild.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable

from etils import epath

FINGERPRINT_KEY = "source_fingerprint"
HEAD_BYTES = 1 << 16
_MAX_NAMED = 5

_log = logging.getLogger(__name__)


def file_fingerprint(path: epath.PathLike, *, head_bytes: int = HEAD_BYTES) -> dict[str, int | str]:
    """Size, modification time (ns) and SHA-256 of the first ``head_bytes`` of one file."""
    path = os.fspath(path)
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def source_fingerprint(
    root: epath.PathLike, names: Iterable[str], *, head_bytes: int = HEAD_BYTES
) -> dict[str, dict[str, int | str]]:
    """The fingerprints of the files ``root/<name>``, keyed by ``name``.

    Args:
      root: the source folder.
      names: file names relative to ``root``.
      head_bytes: how many leading bytes of each file are hashed.

    Returns:
      ``{name: {"size", "mtime_ns", "head_sha256"}}``, JSON-serialisable.
    """
    root = epath.Path(root)
    return {name: file_fingerprint(root / name, head_bytes=head_bytes) for name in names}


def changed_files(stored: dict | None, current: dict) -> list[str]:
    """The differences between two fingerprints, one ``"<name> (<what>)"`` per file.

    A missing ``stored`` fingerprint (a dataset prepared without one) is one difference.
    """
    if not isinstance(stored, dict):
        return ["no source fingerprint stored"]
    changes = [f"{name} (removed)" for name in sorted(stored.keys() - current.keys())]
    for name in sorted(current):
        if name not in stored:
            changes.append(f"{name} (added)")
        elif stored[name] != current[name]:
            changes.append(f"{name} (modified)")
    return changes


def clear_if_stale(prepared, current: dict, *, source: epath.PathLike) -> bool:
    """Deletes a prepared dataset whose stored source fingerprint differs from ``current``.

    Logs a warning naming the changed files. Deleting is safe against a crash: tfds
    writes a dataset into a temporary folder and renames it when complete, so the next
    build finds either no dataset or a whole one. It is not safe while another process
    reads the same dataset.

    Args:
      prepared: a builder of the dataset (``data_dir`` and config set), used to locate it
        and read its metadata.
      current: the fingerprint of the source files now.
      source: the source folder, for the warning.

    Returns:
      Whether a prepared dataset was deleted.
    """
    path = prepared.data_path
    if not path.exists():
        return False
    metadata = prepared.info.metadata
    changes = changed_files(None if metadata is None else metadata.get(FINGERPRINT_KEY), current)
    if not changes:
        return False
    named = ", ".join(changes[:_MAX_NAMED])
    if len(changes) > _MAX_NAMED:
        named += f" and {len(changes) - _MAX_NAMED} more"
    _log.warning(
        "The source files in %r differ from those the dataset prepared in %r was built "
        "from: %s. Deleting it and building it again.",
        os.fspath(source),
        os.fspath(path),
        named,
    )
    path.rmtree()
    return True
