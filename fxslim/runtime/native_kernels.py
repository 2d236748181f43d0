"""Small C kernels shipped as source (``fxslim/runtime/native/*.c``), compiled on first use.

A kernel is a plain C function over raw buffers, built with the system C compiler (``$CC``, else
``cc``) for this machine (``-O3 -march=native``) into a per-user cache and loaded with ctypes. No
torch headers, so a build takes well under a second. The cache key is the source's hash, the
compiler command and the machine, so an edited source or another CPU builds afresh.

Everything that uses a kernel keeps its ATen path: with no compiler, a failed build, or
``FXSLIM_NATIVE=0``, ``load`` returns None and ``unavailable_reason`` says why.

The flags allow reassociating float sums (vectorised dot products) but not ``-ffast-math``, which
would link ``crtfastmath.o`` and switch denormals off for the whole process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["load", "unavailable_reason", "cache_dir"]

_SOURCES = Path(__file__).parent / "native"
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fno-trapping-math",
          "-fno-signed-zeros", "-fassociative-math")
_ENABLE_ENV = "FXSLIM_NATIVE"  # "0" disables every kernel
_CACHE_ENV = "FXSLIM_CACHE_DIR"


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
    key = hashlib.sha256(text + " ".join((compiler, *_FLAGS, platform.machine(), platform.node())).encode())
    target = cache_dir() / "native" / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # built beside the target and renamed: concurrent first uses never load a partial file
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                partial = Path(tmp) / target.name
                result = subprocess.run([compiler, *_FLAGS, "-o", str(partial), str(source)],
                                        capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    return None, f"{compiler} failed on {source.name}: {result.stderr.strip()[:500]}"
                os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"building {source.name} failed: {error}"
    try:
        return ctypes.CDLL(str(target)), ""
    except OSError as error:
        return None, f"loading {target} failed: {error}"


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library built from ``native/<name>.c`` (built now if not cached), or None."""
    return _build(name)[0]


def unavailable_reason(name: str) -> str:
    """Why ``load(name)`` returns None ("" when it does not)."""
    return _build(name)[1]
