"""Small C kernels shipped as source (``fxslim/runtime/native/*.c``), compiled on first use.

A kernel is a plain C function over raw buffers, built with the system C compiler (``$CC``, else
``cc``) for this machine (``-O3 -march=native``) into a per-user cache and loaded with ctypes. No
torch headers, so a build takes well under a second. The cache key is the source's hash, the
compiler command and the machine, so an edited source or another CPU builds afresh.

Everything that uses a kernel keeps its ATen path: with no compiler, a failed build, or
``FXSLIM_NATIVE=0``, ``load`` returns None and ``unavailable_reason`` says why; inside
``disabled()`` (per thread) callers take their ATen paths too, for side-by-side comparisons.

Kernels parallelise with OpenMP where the compiler has it (``-fopenmp``, else built without). The
library asks for ``libgomp.so.1``, the soname of the GNU OpenMP runtime torch has already loaded,
so kernels and torch share one thread pool and ``torch.set_num_threads`` governs both.

The flags allow reassociating float sums (vectorised dot products) but not ``-ffast-math``, which
would link ``crtfastmath.o`` and switch denormals off for the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["load", "function", "unavailable_reason", "cache_dir", "disabled", "active"]

_SOURCES = Path(__file__).parent / "native"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math",
          "-fno-signed-zeros", "-fassociative-math")
_OPENMP = ("-fopenmp",)
_ENABLE_ENV = "FXSLIM_NATIVE"  # "0" disables every kernel
_CACHE_ENV = "FXSLIM_CACHE_DIR"
_off = threading.local()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """On this thread, every caller of a kernel takes its ATen path (``active()`` is False)."""
    before = getattr(_off, "value", False)
    _off.value = True
    try:
        yield
    finally:
        _off.value = before


def active() -> bool:
    """False inside ``disabled()`` on this thread."""
    return not getattr(_off, "value", False)


def cache_dir() -> Path:
    """Where built kernels live: ``$FXSLIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxslim`` (``~/.cache/fxslim``)."""
    if os.environ.get(_CACHE_ENV):
        return Path(os.environ[_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxslim"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


@functools.cache
def _build(name: str) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(_ENABLE_ENV, "1") == "0":
        return None, f"{_ENABLE_ENV}=0"
    source = _SOURCES / f"{name}.c"
    if not source.is_file():
        raise ValueError(f"native kernel {name!r}: no source {source}")
    compiler = _compiler()
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC') or 'cc'} not on PATH; set CC)"
    text = source.read_bytes()
    errors = []
    for extra in (_OPENMP, ()):
        flags = (*_FLAGS, *extra)
        key = hashlib.sha256(text + " ".join((compiler, *flags, platform.machine(), platform.node())).encode())
        target = cache_dir() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
        if target.is_file():
            break
        error = _compile(compiler, flags, source, target)
        if error is None:
            break
        errors.append(error)
    else:
        return None, "; ".join(errors)
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as error:
        return None, f"loading {target} failed: {error}"


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> str | None:
    """Build ``source`` into ``target``; None, or what went wrong."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # built beside the target and renamed: concurrent first uses never load a partial file
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, "-o", str(partial), str(source)], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode != 0:
                return f"{compiler} {' '.join(flags[-1:])} failed on {source.name}: {result.stderr.strip()[:300]}"
            os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as error:
        return f"building {source.name} failed: {error}"
    return None


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library built from ``native/<name>.c`` (built now if not cached), or None."""
    return _build(name)[0]


@functools.cache
def function(name: str, symbol: str, restype: type | None, *argtypes: type):
    """The C function ``symbol`` of kernel ``name`` with its ctypes signature set, or None where
    ``load(name)`` is None."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def unavailable_reason(name: str) -> str:
    """Why ``load(name)`` returns None ("" when it does not)."""
    return _build(name)[1]
