"""Checkpoints: what a model name resolves to, and a checkpoint's identity.

`default` is the default model (downloaded and converted once into the cache),
a .gguf file is converted once into an HF folder in the cache, and an HF
folder is used as it is. The engine and `kvtriton build` both resolve names here,
so a name means the same checkpoint to both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("kvtriton")
# In a folder converted from a GGUF served by path: the file, and the weights the folder leaves in it
# (gguf_checkpoint.convert_gguf's floats="unstored").
GGUF_SOURCE = "gguf_source.json"


def resolve_checkpoint(checkpoint: str, say: Callable[[str], None] = log.info) -> Path:
    """An HF folder for `checkpoint`: 'default', an HF folder, or a .gguf converted once into the cache."""
    # Imported here: reading GGUF needs the gguf package, which a host serving an HF folder may lack.
    if checkpoint == "default":
        from kvtriton.backend.models.default_model import ensure_default_model

        return ensure_default_model(progress=say)
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from kvtriton.backend.models.cache import cache_dir
        from kvtriton.backend.models.gguf_checkpoint import convert_gguf

        target = cache_dir() / "checkpoints" / f"{path.stem}-{checkpoint_sha256(path)[:16]}"
        if not (target / "config.json").is_file():
            say(f"      converting {path.name} to an HF folder in {target}")
            target.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(path, target, floats="unstored")  # the blocks stay in the file: loader reads them
        else:
            point_at(target, path)
        return target
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"checkpoint {checkpoint!r}: give an HF folder (with config.json), a .gguf file, "
                            f"or 'default'")


def gguf_identity(gguf: Path) -> dict:
    """What GGUF_SOURCE records of its file: the path, and the size and mtime by which a later load knows it is
    the file converted."""
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def point_at(folder: Path, gguf: Path) -> None:
    """Record `gguf` as the file a folder converted with floats="unstored" reads its blocks from: the folder is
    named by the file's sha256, so a copy or a move of the same bytes (or a touched file) serves from it too."""
    source = folder / GGUF_SOURCE
    if not source.is_file():
        return
    record, now = json.loads(source.read_text()), gguf_identity(gguf)
    if any(record.get(key) != value for key, value in now.items()):
        staged = source.with_name(f".{GGUF_SOURCE}.{os.getpid()}")  # a reader never sees half a file
        try:
            staged.write_text(json.dumps({**record, **now}, indent=2) + "\n")
            os.replace(staged, source)
        except OSError as e:  # a read-only cache: the load says what the folder still points at, if it must
            log.warning("could not record %s as the source of %s: %s", gguf, folder, e)


def checkpoint_sha256(path: str | Path) -> str:
    """A .gguf file's sha256, or one over an HF folder's config.json and weight files (name + bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        files = sorted([path / "config.json", *path.glob("*.safetensors")])
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()
