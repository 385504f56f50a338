"""Folders written whole or not at all: write into a hidden sibling, fsync, then swap it into place.

Used by `seesr convert`, the end-of-training exports and the training checkpoints. The previous folder (if any) is
moved aside only once the new one is complete, and deleted only after the new one is in place, so a crash at any
point leaves either the old folder or the new one (plus, at worst, a hidden leftover), never a half-written one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder`, then the folders themselves (so a rename after it publishes durable data)."""
    folder = Path(folder)
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str | Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def replace_folder(staging: str | Path, final: str | Path) -> None:
    """Move the complete folder `staging` to `final`; an existing `final` is deleted only after the swap."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    try:
        staging.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(output_dir: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(folder)` into a hidden temporary sibling of `output_dir`, then `replace_folder` it into place."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write(staging)
        replace_folder(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
