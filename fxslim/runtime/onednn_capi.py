"""oneDNN's C API through ctypes: the few calls PROM's direct runtime makes.

torch runs oneDNN inside but hides its symbols, so its primitives are reachable only through ATen's
ops, which cost 7.5 µs of bookkeeping per call from TorchScript and 20 µs from Python: more than
half of MobileNetV2's kernels take. oneDNN's own library, the ``onednn-cpu-gomp`` wheel (the
``fxslim[onednn]`` extra; oneDNN 3.2 on GNU OpenMP), executes a primitive in about 1 µs. Its
libgomp dependency resolves to the libgomp torch has loaded (the same soname), so both share one
thread pool and ``torch.set_num_threads`` governs its threads too.

Only the calls PROM needs are bound: engine and stream, memory descriptors given by strides (or
left to the primitive, for weights), memory objects over tensors' storage, u8 convolutions with
runtime scales, zero points and sum/ReLU post-ops, reorders, and execution. Every handle is owned
by a Python object that frees it when collected.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

__all__ = ["available", "unavailable_reason", "library", "F32", "S32", "S8", "U8", "ARG_SRC", "ARG_WEIGHTS",
           "ARG_BIAS", "ARG_DST", "ARG_SCRATCHPAD", "ARG_SCALES", "ARG_ZERO_POINTS", "MemoryDesc", "Memory",
           "Primitive", "ConvolutionDesc", "OneDNNError", "conv_attr", "reorder", "execute", "stream"]

# dnnl_data_type_t, dnnl_prop_kind_t, dnnl_alg_kind_t, dnnl_query_t, DNNL_ARG_* (oneDNN 3.x headers)
F32, S32, S8, U8 = 3, 4, 5, 6
_FORMAT_ANY = 1
_CPU, _IN_ORDER, _FORWARD_INFERENCE, _CONV_DIRECT = 1, 1, 96, 1
_ELTWISE_RELU, _ELTWISE_LINEAR, _ELTWISE_CLIP, _ELTWISE_ROUND = 0x20, 0x26, 0x2E, 0x32  # dnnl_alg_kind_t
_QUERY_IMPL_INFO, _QUERY_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 8, 131, 136
_SCRATCHPAD_USER, _RUNTIME_OMP = 1, 2
ARG_SRC, ARG_DST, ARG_WEIGHTS, ARG_BIAS, ARG_SCRATCHPAD = 1, 17, 33, 41, 80
ARG_SCALES, ARG_ZERO_POINTS = 4096, 8192  # or-ed with the argument they apply to
_MAX_DIMS = 12
_Dims = ctypes.c_int64 * _MAX_DIMS
_p = ctypes.c_void_p
_WHEEL = "onednn-cpu-gomp"
_ENV = "FXSLIM_LIBDNNL"  # a path to another libdnnl.so.3 (oneDNN 3.x on OpenMP), or "" to use none


class ExecArg(ctypes.Structure):
    """dnnl_exec_arg_t: an argument index and a memory object."""
    _fields_ = [("arg", ctypes.c_int), ("memory", _p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int), ("hash", ctypes.c_char_p),
                ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


def _candidates() -> list[Path]:
    if _ENV in os.environ:
        return [Path(os.environ[_ENV])] if os.environ[_ENV] else []
    paths = []
    try:
        dist = metadata.distribution(_WHEEL)
        paths += [Path(dist.locate_file(f)).resolve() for f in dist.files or () if f.name == "libdnnl.so.3"]
    except metadata.PackageNotFoundError:
        pass
    return paths + [Path(sys.prefix) / "lib" / "libdnnl.so.3"]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    tried = []
    for path in _candidates():
        if not path.is_file():
            tried.append(f"{path}: no such file")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as error:
            tried.append(f"{path}: {error}")
            continue
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        version = lib.dnnl_version().contents
        if version.major != 3 or version.cpu_runtime != _RUNTIME_OMP:
            tried.append(f"{path}: oneDNN {version.major}.{version.minor}, CPU runtime {version.cpu_runtime}; "
                         f"expected 3.x on OpenMP ({_RUNTIME_OMP})")
            continue
        _declare(lib)
        return lib, ""
    hint = f"install the fxslim[onednn] extra ({_WHEEL})"
    return None, f"oneDNN's C library was not found ({'; '.join(tried) or 'disabled by ' + _ENV}): {hint}"


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("dnnl_engine_create", "dnnl_stream_create", "dnnl_memory_desc_create_with_strides",
                 "dnnl_memory_desc_create_with_tag", "dnnl_memory_desc_destroy", "dnnl_primitive_attr_create",
                 "dnnl_primitive_attr_destroy", "dnnl_primitive_attr_set_scales_mask",
                 "dnnl_primitive_attr_set_zero_points_mask", "dnnl_primitive_attr_set_scratchpad_mode",
                 "dnnl_post_ops_create", "dnnl_post_ops_destroy", "dnnl_post_ops_append_sum",
                 "dnnl_post_ops_append_eltwise", "dnnl_primitive_attr_set_post_ops",
                 "dnnl_convolution_forward_primitive_desc_create", "dnnl_reorder_primitive_desc_create",
                 "dnnl_primitive_desc_destroy", "dnnl_primitive_desc_query", "dnnl_primitive_create",
                 "dnnl_primitive_destroy", "dnnl_memory_create", "dnnl_memory_destroy", "dnnl_memory_set_data_handle",
                 "dnnl_memory_desc_clone", "dnnl_memory_desc_equal", "dnnl_primitive_desc_next_impl"):
        getattr(lib, name).restype = ctypes.c_int
    lib.dnnl_primitive_execute.restype = ctypes.c_int
    lib.dnnl_primitive_execute.argtypes = [_p, _p, ctypes.c_int, _p]
    lib.dnnl_memory_set_data_handle.argtypes = [_p, _p]
    lib.dnnl_primitive_desc_query_md.restype = _p
    lib.dnnl_primitive_desc_query_md.argtypes = [_p, ctypes.c_int, ctypes.c_int]
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    lib.dnnl_memory_desc_get_size.argtypes = [_p]
    lib.dnnl_post_ops_append_sum.argtypes = [_p, ctypes.c_float, ctypes.c_int32, ctypes.c_int]
    lib.dnnl_post_ops_append_eltwise.argtypes = [_p, ctypes.c_int, ctypes.c_float, ctypes.c_float]


def available() -> bool:
    """Whether oneDNN's C library (3.x on OpenMP) could be loaded."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ('' when it is True)."""
    return _load()[1]


def library() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return lib


class OneDNNError(RuntimeError):
    """A oneDNN call returned a status other than success (its dnnl_status_t in the message)."""


def _check(status: int, what: str) -> None:
    if status != 0:
        raise OneDNNError(f"oneDNN {what} failed with status {status}")


@functools.cache
def _engine_and_stream() -> tuple[_p, _p]:
    lib = library()
    engine, stream = _p(), _p()
    _check(lib.dnnl_engine_create(ctypes.byref(engine), _CPU, ctypes.c_size_t(0)), "engine creation")
    _check(lib.dnnl_stream_create(ctypes.byref(stream), engine, ctypes.c_uint(_IN_ORDER)), "stream creation")
    return engine, stream


class _Handle:
    """A oneDNN handle freed by ``_destroy`` when this object is collected."""

    _destroy = ""
    handle = _p()  # until a constructor's oneDNN call succeeds

    def __init__(self, handle: _p) -> None:
        self.handle = handle

    def __del__(self) -> None:
        lib = _load()[0]
        if lib is not None and self.handle:
            getattr(lib, self._destroy)(self.handle)
            self.handle = _p()


class MemoryDesc(_Handle):
    """A memory descriptor: ``shape`` of ``dtype`` with ``strides`` in elements, or, with ``strides=None``,
    a layout the primitive picks (``format_tag_any``, for weights)."""

    _destroy = "dnnl_memory_desc_destroy"

    def __init__(self, shape: Sequence[int], dtype: int, strides: Sequence[int] | None) -> None:
        lib, handle = library(), _p()
        if strides is None:
            status = lib.dnnl_memory_desc_create_with_tag(ctypes.byref(handle), len(shape), _Dims(*shape), dtype,
                                                          _FORMAT_ANY)
        else:
            status = lib.dnnl_memory_desc_create_with_strides(ctypes.byref(handle), len(shape), _Dims(*shape), dtype,
                                                              _Dims(*strides))
        _check(status, f"memory descriptor {list(shape)}")
        super().__init__(handle)

    @classmethod
    def copy_of(cls, queried: int) -> MemoryDesc:
        """A descriptor of our own, cloned from one a primitive descriptor returned (valid only while it lives)."""
        desc = cls.__new__(cls)
        handle = _p()
        _check(library().dnnl_memory_desc_clone(ctypes.byref(handle), _p(queried)), "memory descriptor clone")
        _Handle.__init__(desc, handle)
        return desc

    @property
    def size(self) -> int:
        """Bytes a memory of this descriptor takes."""
        return int(library().dnnl_memory_desc_get_size(self.handle))


class Memory(_Handle):
    """A memory object over ``pointer`` (a tensor's storage, kept alive by the caller)."""

    _destroy = "dnnl_memory_destroy"

    def __init__(self, desc: MemoryDesc, pointer: int) -> None:
        handle = _p()
        _check(library().dnnl_memory_create(ctypes.byref(handle), desc.handle, _engine_and_stream()[0], _p(pointer)),
               "memory creation")
        super().__init__(handle)
        self.desc = desc

    def point_to(self, pointer: int) -> None:
        _check(library().dnnl_memory_set_data_handle(self.handle, pointer), "memory data handle")


class Primitive(_Handle):
    _destroy = "dnnl_primitive_destroy"


class _Attr(_Handle):
    _destroy = "dnnl_primitive_attr_destroy"


class _PostOps(_Handle):
    _destroy = "dnnl_post_ops_destroy"


class _PrimitiveDesc(_Handle):
    _destroy = "dnnl_primitive_desc_destroy"

    def md(self, query: int) -> MemoryDesc:
        return MemoryDesc.copy_of(library().dnnl_primitive_desc_query_md(self.handle, query, 0))

    @property
    def implementation(self) -> str:
        name = ctypes.c_char_p()
        _check(library().dnnl_primitive_desc_query(self.handle, _QUERY_IMPL_INFO, 0, ctypes.byref(name)), "query")
        return (name.value or b"").decode()

    def skip(self, implementations: tuple[str, ...]) -> None:
        """Move on to the next implementation oneDNN offers while the current one is in ``implementations``."""
        while self.implementation in implementations:
            _check(library().dnnl_primitive_desc_next_impl(self.handle), "next implementation")

    def primitive(self) -> Primitive:
        handle = _p()
        _check(library().dnnl_primitive_create(ctypes.byref(handle), self.handle), "primitive creation")
        return Primitive(handle)


def conv_attr(weight_scale_mask: int, sum_post_op: tuple[float, int] | None, relu: bool,
              zero_points: tuple[bool, bool] = (True, True), grid: tuple[float, int] | None = None) -> _Attr:
    """Attributes of a u8 conv: runtime scales of the weights only (``weight_scale_mask``: the dims
    they vary along; src and dst then have scale 1, so the caller folds theirs into these, the bias
    and the sum's scale), runtime zero points of src and of dst where ``zero_points`` says so (the
    primitive then takes them as arguments; without one it is 0), a user scratchpad, and as post-ops
    ``grid`` = (scale, zero point) of a grid, relative to dst's, to round the conv's value onto
    (to its codes, clipped to 0..255, rounded half to even, and back), then ``sum_post_op`` =
    (scale, zero point) of what dst held, then ReLU."""
    lib = library()
    attr, ops = _p(), _p()
    _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attribute creation")
    owner = _Attr(attr)
    _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "scratchpad mode")
    _check(lib.dnnl_primitive_attr_set_scales_mask(attr, ARG_WEIGHTS, weight_scale_mask), "scales mask")
    for arg, present in zip((ARG_SRC, ARG_DST), zero_points, strict=True):
        if present:
            _check(lib.dnnl_primitive_attr_set_zero_points_mask(attr, arg, 0), "zero points mask")
    _check(lib.dnnl_post_ops_create(ctypes.byref(ops)), "post-ops creation")
    post_ops = _PostOps(ops)
    if grid is not None:
        scale, zero_point = grid
        for alg, alpha, beta in ((_ELTWISE_LINEAR, 1 / scale, zero_point), (_ELTWISE_CLIP, 0.0, 255.0),
                                 (_ELTWISE_ROUND, 0.0, 0.0), (_ELTWISE_LINEAR, scale, -zero_point * scale)):
            _check(lib.dnnl_post_ops_append_eltwise(ops, alg, alpha, beta), "grid post-op")
    if sum_post_op is not None:
        _check(lib.dnnl_post_ops_append_sum(ops, sum_post_op[0], sum_post_op[1], 0), "sum post-op")
    if relu:
        _check(lib.dnnl_post_ops_append_eltwise(ops, _ELTWISE_RELU, 0.0, 0.0), "ReLU post-op")
    _check(lib.dnnl_primitive_attr_set_post_ops(attr, ops), "post-ops")
    del post_ops  # the attribute holds a copy
    return owner


class ConvolutionDesc(_PrimitiveDesc):
    """A forward-inference convolution's primitive descriptor. ``weights`` may leave its layout to the
    primitive (``weights_desc`` then says which); ``dilation`` as in torch (1: none)."""

    def __init__(self, src: MemoryDesc, weights: MemoryDesc, bias: MemoryDesc, dst: MemoryDesc, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], attr: _Attr) -> None:
        handle = _p()
        pad = _Dims(*padding)
        _check(library().dnnl_convolution_forward_primitive_desc_create(
            ctypes.byref(handle), _engine_and_stream()[0], _FORWARD_INFERENCE, _CONV_DIRECT, src.handle, weights.handle,
            bias.handle, dst.handle, _Dims(*stride), _Dims(*(d - 1 for d in dilation)), pad, pad, attr.handle),
            "convolution descriptor")
        super().__init__(handle)

    @property
    def weights_desc(self) -> MemoryDesc:
        return self.md(_QUERY_WEIGHTS_MD)

    @property
    def scratchpad_desc(self) -> MemoryDesc:
        return self.md(_QUERY_SCRATCHPAD_MD)


def reorder(src: MemoryDesc, dst: MemoryDesc) -> Primitive:
    """A primitive copying a memory of ``src``'s layout into one of ``dst``'s."""
    handle, (engine, _) = _p(), _engine_and_stream()
    _check(library().dnnl_reorder_primitive_desc_create(ctypes.byref(handle), src.handle, engine, dst.handle, engine,
                                                        None), "reorder descriptor")
    return _PrimitiveDesc(handle).primitive()


def execute(primitive: Primitive, args: ctypes.Array) -> None:
    """Run ``primitive`` on ``args`` (an ``ExecArg`` array); the stream is in order on the calling thread."""
    _check(library().dnnl_primitive_execute(primitive.handle, _engine_and_stream()[1], len(args), args),
           "primitive execution")


def stream() -> _p:
    """The in-order CPU stream every primitive runs on."""
    return _engine_and_stream()[1]
