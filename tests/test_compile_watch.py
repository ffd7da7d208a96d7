"""kernels/compile_watch.py: a Triton compile after start-up is named in the log, with how long it took.

Triton's JIT calls the two hooks with keyword arguments (triton/runtime/jit.py, JITFunction._call_hook); here
they are called the same way, and watch_compiles installs them on a stand-in for `triton.knobs`, so these run
without a GPU or Triton.
"""

from __future__ import annotations

import logging
import sys
import types

from kvtriton.backend.kernels.compile_watch import CompileWatch, watch_compiles


def hook_kwargs(key: str, name: str) -> dict:
    return dict(key=key, repr=f"{name}[num_warps=4](M: i32)", fn=types.SimpleNamespace(name=name), compile={},
                is_manual_warmup=False, already_compiled=False)


def test_a_compile_is_logged_with_its_kernel_and_time(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.WARNING, logger="kvtriton"):
        assert watch.before(**hook_kwargs("k1", "_fp8_matmul")) is False  # False: Triton goes on and compiles
        watch._started["k1"] -= 0.276  # as long as the compile that stalled an H200's 64 requests
        watch.after(**hook_kwargs("k1", "_fp8_matmul"))
    assert watch.compiles == 1
    [record] = caplog.records
    assert "Triton compiled _fp8_matmul while serving in 276 ms" in record.getMessage()
    assert "(M: i32)" in record.getMessage()


def test_a_variant_loaded_from_tritons_cache_is_logged_at_debug_level_only(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.DEBUG, logger="kvtriton"):
        watch.before(**hook_kwargs("k2", "_skinny_matmul"))
        watch.after(**hook_kwargs("k2", "_skinny_matmul"))  # at once: a load from the on-disk cache
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and "_skinny_matmul" in record.getMessage() and watch.compiles == 1


def test_hooks_go_in_once_and_never_over_another_tools(monkeypatch):
    runtime = types.SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=runtime)))
    watch = watch_compiles()
    assert watch is not None
    assert runtime.jit_cache_hook == watch.before and runtime.jit_post_compile_hook == watch.after
    assert watch_compiles() is None  # the hooks are taken (by the first watch): left as they are
    assert runtime.jit_post_compile_hook == watch.after


def test_without_triton_nothing_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `from triton import knobs` raises ImportError
    assert watch_compiles() is None
