"""Which TensorRT this process has: full `tensorrt`, else TensorRT for RTX. Engines of one never load in the other."""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")

def import_tensorrt() -> ModuleType:
    for name in _MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"no TensorRT Python module found (tried {', '.join(_MODULES)}); install TensorRT, or "
                      "TensorRT for RTX: pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


def flavour(trt: ModuleType) -> str:
    """'tensorrt' or 'tensorrt_rtx': engines of one do not load in the other."""
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"
