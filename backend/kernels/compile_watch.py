"""Triton kernels compiled while serving: each one named in the log, with how long the step waited for it.

Triton compiles a kernel variant the first time a launch meets it (one per class of each integer argument: == 1,
a multiple of 16, other). The runner compiles its variants at start-up, capturing the CUDA graphs; a variant met
only later stalls the step that meets it, and every request in it, for the compile: on an H200, `_fp8_matmul`
met with an eager step's row count took 276 ms, and that 64-request run's TTFT p50 went from 22-39 to 299 ms
(tile_config.ROWS_NOT_SPECIALIZED is the fix). Such a stall otherwise leaves no trace. Once the engine is ready,
`watch_compiles` hooks Triton's JIT (its `jit_cache_hook`, called before a compile, and `jit_post_compile_hook`,
after) and logs one warning per compile: a gap in the start-up's warm-up, or a specialization to turn off.
A variant found in Triton's on-disk cache is loaded in ~1 ms (an H100: precision_bench's out-of-graph probes met
five): that one is logged at debug level only.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("kvtriton")

# Shorter than this, the variant came from Triton's on-disk cache (a compile takes tens to hundreds of ms).
CACHE_LOAD_MS = 10.0


class CompileWatch:
    """Triton's two JIT hooks (keyword arguments as Triton passes them); counts and logs each compile."""

    def __init__(self) -> None:
        self.compiles = 0
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()  # any thread that launches a kernel may compile

    def before(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        with self._lock:
            self._started[str(key)] = time.perf_counter()
        return False  # True would tell Triton to skip the compile

    def after(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled) -> None:
        with self._lock:
            started = self._started.pop(str(key), None)
            self.compiles += 1
        ms = None if started is None else (time.perf_counter() - started) * 1e3
        took = "" if ms is None else f" in {ms:.0f} ms"
        level = logging.DEBUG if ms is not None and ms < CACHE_LOAD_MS else logging.WARNING
        log.log(level, "Triton compiled %s while serving%s; the step that launched it waited (a variant the "
                "start-up did not compile): %s", fn.name, took, repr)


def watch_compiles() -> CompileWatch | None:
    """Hook Triton's JIT for the rest of the process; None without Triton, or where another tool (a profiler)
    holds the hooks already, which are left as they are."""
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = knobs.runtime
    if runtime.jit_cache_hook is not None or runtime.jit_post_compile_hook is not None:
        return None
    watch = CompileWatch()
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = watch.before, watch.after
    return watch
