"""Atomic file writes: every artifact is written to a temporary name, then renamed.

A killed run, or a disk that fills up mid-write, never leaves a half-written ONNX, report or
plot under the final name: the previous artifact stays intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file keeps ``path``'s suffix (some writers, ONNX Runtime's among them, look
    at it). On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


#: ``tempfile.mkstemp(prefix=".<name>.", suffix=<name's suffix>)``: 8 random characters between.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>(?:\.[^.]*)?)$")


def _is_temporary(path: Path) -> bool:
    """Whether ``path`` is an :func:`atomic_path` temporary (``.<name>.<8 chars><suffix>``)."""
    m = _TEMPORARY.match(path.name)
    return bool(m) and m["suffix"] == Path(m["name"]).suffix and path.is_file()


def remove_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete what :func:`atomic_path` left behind in ``root`` (recursively) when a process was
    killed mid-write (``SIGKILL`` skips its cleanup); returns the removed paths.

    Only names of the exact temporary form are touched: the final artifacts, which are always
    complete, stay.
    """
    removed = []
    for path in sorted(Path(root).rglob(".*")):
        if _is_temporary(path):
            path.unlink()
            removed.append(path)
    return removed


def load_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` with a one-line ``UserError`` when it fails.

    ``weights_only`` means a checkpoint (downloaded, say) cannot run code when loaded.
    """
    import torch

    from distill.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: '{path}'")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0][:160] if text else type(exc).__name__
        raise UserError(f"{what} '{path}' cannot be read (corrupted or not a torch file): "
                        f"{first}") from None
