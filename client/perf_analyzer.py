"""perf_analyzer and genai-perf on a machine without NVIDIA's SDK container: the binary, its libraries.

    python -m kvtriton.client.perf_analyzer genai-perf profile -m llm --service-kind triton --backend vllm ...
    python -m kvtriton.client.perf_analyzer perf_analyzer -m llm -i grpc --streaming ...

The tritonclient 2.51 wheel bundles a working perf_analyzer (newer wheels ship an empty placeholder); it needs
libb64.so.0d and libcudart.so.12, which the nvidia-pytriton wheel carries under hashed names. Run as a module,
this links the two under their own names into a temporary folder, puts it on LD_LIBRARY_PATH and the venv's
bin first on PATH (genai-perf runs `perf_analyzer` from PATH), and runs the command unchanged; its exit
status is the command's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence


def find_perf_analyzer() -> Path:
    found = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(found).is_file():
        raise SystemExit("perf_analyzer not found: install tritonclient[all]==2.51.0 (it bundles a working binary)")
    return Path(found)


def perf_analyzer_libs(folder: Path) -> Path:
    """Links the two shared libraries perf_analyzer lacks, from nvidia-pytriton's bundled ones."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("perf_analyzer needs libb64/libcudart; install nvidia-pytriton==0.7.0, which carries them")
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise SystemExit(f"no {pattern} in {libs}; reinstall nvidia-pytriton==0.7.0")
        (folder / name).symlink_to(matches[0])
    return folder


def perf_analyzer_env(libs: Path) -> dict[str, str]:
    """This process's environment with `libs` on LD_LIBRARY_PATH and perf_analyzer's folder first on PATH."""
    def prepend(folder: Path, variable: str) -> str:
        return os.pathsep.join(filter(None, [str(folder), os.environ.get(variable)]))

    return {**os.environ, "LD_LIBRARY_PATH": prepend(libs, "LD_LIBRARY_PATH"),
            "PATH": prepend(find_perf_analyzer().parent, "PATH")}


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command or command[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if command else 2
    with tempfile.TemporaryDirectory(prefix="kvtriton-perf-analyzer-") as tmp:
        try:
            return subprocess.run(command, env=perf_analyzer_env(perf_analyzer_libs(Path(tmp)))).returncode
        except FileNotFoundError:
            raise SystemExit(f"{command[0]}: not found (genai-perf: pip install -e '.[genai-perf]')") from None
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
