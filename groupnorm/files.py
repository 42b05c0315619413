"""Result files: where they may go, and writing them whole (used by `groupnorm study` and `groupnorm bench`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def output_dir_problem(path) -> str | None:
    """None when results can be written to the output folder ``path`` (a pathlib.Path), whether
    it exists or would be created, else what is wrong, for a message given before any long work
    starts. It creates nothing: a command that stops at a later check (a wrong --data) leaves no
    empty folder behind."""
    try:
        if path.exists():
            if not path.is_dir():
                return "it is a file, not a directory"
            return None if os.access(path, os.W_OK | os.X_OK) else "not writable"
        parent = path.absolute()
        while not parent.exists():
            if os.path.lexists(parent):  # a link to nowhere: mkdir would fail on it later
                return f"{parent} is a broken symbolic link"
            parent = parent.parent
    except OSError as exc:  # a link loop, an ancestor we may not search
        return exc.strerror or str(exc)
    if not parent.is_dir():
        return f"{parent} is a file, not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create it: {parent} is not writable"


def make_output_dir(path) -> str | None:
    """Create the output folder ``path`` (a pathlib.Path, parents included) and write and delete a
    scratch file in it: None when that worked, else why not. Only trying tells: os.access says yes
    to root everywhere, /proc and read-only mounts included."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def write_atomic(path: Path, text: str) -> None:
    """path holds either its old text or ``text``, never part of it (a temporary file, fsync'd, then
    renamed over it); a failed write (disk full, a kill) leaves the old file and no temporary."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
