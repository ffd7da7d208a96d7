"""Which ``tritonserver`` runs, and the environment it runs in.

Two installs are supported, found in this order:

- a ``tritonserver`` on PATH (NVIDIA's image: /opt/tritonserver/bin, backends in
  /opt/tritonserver/backends);
- the binaries inside the ``nvidia-pytriton`` wheel (Triton 2.51), which makes a
  GPU-less dev box or CI runner able to run the same server.

The wheel's server needs the Python-backend stub built for this interpreter's
Python version put in place (``prepare_python_stub``), and an environment in
which that stub finds this interpreter's site-packages (``server_env``).
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


class TritonServerError(RuntimeError):
    """A server that cannot be found, started or made ready; the message says what to do."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    source: str  # "PATH" or "nvidia-pytriton"

    def __post_init__(self) -> None:
        if self.source not in ("PATH", "nvidia-pytriton"):
            raise ValueError(f"TritonInstall.source must be 'PATH' or 'nvidia-pytriton', got {self.source!r}")


def find_tritonserver() -> TritonInstall:
    """The tritonserver on PATH if any, else the one in the nvidia-pytriton wheel."""
    install = _install_on_path() or _install_in_wheel()
    if install is None:
        raise TritonServerError(
            "no tritonserver found: none on PATH (NVIDIA's image has /opt/tritonserver/bin/tritonserver) "
            "and the nvidia-pytriton wheel is not installed; run `pip install nvidia-pytriton==0.7.0` "
            "(or `pip install kvtriton[server]`), or use the nvcr.io/nvidia/tritonserver image"
        )
    return install


def _install_on_path() -> TritonInstall | None:
    found = shutil.which("tritonserver")
    if found is None:
        return None
    binary = Path(found).resolve()
    backend_dir = binary.parent.parent / "backends"  # <prefix>/bin/tritonserver -> <prefix>/backends
    if not backend_dir.is_dir():
        raise TritonServerError(
            f"tritonserver on PATH ({binary}) has no backends folder at {backend_dir}; "
            "use a full Triton install such as NVIDIA's tritonserver image"
        )
    return TritonInstall(binary=binary, backend_dir=backend_dir, source="PATH")


def _install_in_wheel() -> TritonInstall | None:
    # find_spec locates the package without importing pytriton's Python API.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonServerError(f"the nvidia-pytriton wheel has no server binary at {binary}; "
                                "reinstall nvidia-pytriton==0.7.0")
    return TritonInstall(binary=binary, backend_dir=root / "backends", source="nvidia-pytriton")


def prepare_python_stub(install: TritonInstall) -> Path:
    """Put the Python-backend stub matching this interpreter where the wheel's server looks for it.

    The wheel ships one stub per Python version; the stub embeds that version's
    libpython, so it must match the ``python3`` that ``server_env`` puts first on PATH.
    NVIDIA's image already has its stub in place. Returns the stub's path.
    """
    dest = install.backend_dir / "python" / "triton_python_backend_stub"
    if install.source == "PATH":
        return dest
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = install.backend_dir.parent / "python_backend_stubs"
    src = stubs / version / "triton_python_backend_stub"
    if not src.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonServerError(
            f"nvidia-pytriton has no Python backend stub for Python {version} (it has: {', '.join(have) or 'none'}); "
            "run kvtriton from a Python of one of those versions, or use NVIDIA's tritonserver image"
        )
    if dest.is_file() and filecmp.cmp(src, dest, shallow=False):
        return dest
    # Copy then rename: a concurrent server start never sees a half-written stub.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)
    return dest


def server_env() -> dict[str, str]:
    """The environment for tritonserver, so its Python stub runs in this environment.

    The stub ignores PYTHONPATH: it takes site-packages from the ``python3`` first on
    PATH, so this interpreter's bin folder goes first. LD_LIBRARY_PATH gains this
    interpreter's LIBDIR, so the stub loads the matching libpython rather than the
    system one. LIBDIR goes last: entries already there (CUDA compat libraries in
    NVIDIA's image) keep priority, and LD_LIBRARY_PATH as a whole still beats the
    system default folders.
    """
    env = dict(os.environ)
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]) if env.get("PATH") else bin_dir
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        existing = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*existing, libdir] if libdir not in existing else existing)
    return env
