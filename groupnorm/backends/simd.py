"""Explicit SIMD vectors for the numba kernels: one 64-byte vector (16 float32 or 8 float64).

Why: numba runs LLVM's loop vectorizer but not its SLP vectorizer (off since numba #8705), so
a reduction whose partial sums should stay in registers across rows (per-channel sums of a
channels-last (S, C) block) compiles either to scalar code or to vector code that loads and
stores its accumulators from memory on every row; the latter is what ``_cl_*_rows`` did, and on
small maps with C <= 256 it ran at half ATen's speed. With these, a kernel names its vectors
itself and LLVM keeps them in registers (on AVX2 a 64-byte vector is two ymm registers).

The operations are the plain IEEE ones (no fast-math flags) except ``vmuladd``, which is
``llvm.fmuladd``: fused where the CPU has FMA, as ``fastmath={"contract"}`` allows elsewhere
(``smuladd`` is the same on scalars, for rows a vector loop leaves to scalar code).
Loads and stores are unaligned and unchecked: the caller keeps ``i + width(a) <= a.size``.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 64


def host_has_avx512() -> bool:
    """Whether the CPU numba compiles for has AVX-512F (numba's NUMBA_CPU_FEATURES decides when
    set, as it does for numba's own code generation). numba's cache keys compiled code by the
    CPU's name and features, so code compiled with this answer is not loaded on a CPU where it
    would differ."""
    from numba.core import config

    if config.CPU_FEATURES:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


HOST_AVX512 = host_has_avx512()


class Vec(types.Type):
    """A VECTOR_BYTES-byte SIMD vector of a float dtype."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.width = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vec{self.width}x{dtype}")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.width))


def _element_pointer(context, builder, arytype, ary, index):
    data = context.make_array(arytype)(context, builder, ary).data
    return builder.gep(data, [index])


@intrinsic
def vwidth(typingctx, a):
    """The lanes of a's vector, VECTOR_BYTES // a.itemsize, as a compile-time constant: computed
    from the array's itemsize field at run time, the block loops' offsets W, 2W, 3W were not
    constants, and LLVM kept a pointer register per offset (reloaded from the stack each row)."""
    width = VECTOR_BYTES // (a.dtype.bitwidth // 8)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, width)

    return types.intp(a), codegen


@intrinsic
def vload(typingctx, a, i):
    """The vector a[i:i + width]."""
    vt = Vec(a.dtype)

    def codegen(context, builder, sig, args):
        p = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        vp = builder.bitcast(p, context.get_value_type(vt).as_pointer())
        return builder.load(vp, align=a.dtype.bitwidth // 8)

    return vt(a, i), codegen


@intrinsic
def vstore(typingctx, a, i, v):
    """a[i:i + width] = v."""

    def codegen(context, builder, sig, args):
        p = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.void(a, i, v), codegen


def _splat(context, builder, vt, value):
    lt = context.get_value_type(vt)
    v = builder.insert_element(ir.Constant(lt, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), vt.width), [0] * vt.width)
    return builder.shuffle_vector(v, ir.Constant(lt, ir.Undefined), zeros)


@intrinsic
def vsplat(typingctx, a, x):
    """A vector of a's dtype with x in every lane."""
    vt = Vec(a.dtype)

    def codegen(context, builder, sig, args):
        return _splat(context, builder, vt, context.cast(builder, args[1], sig.args[1], a.dtype))

    return vt(a, x), codegen


F64_LANES = VECTOR_BYTES // 8  # the lanes of a float64 vector (vload_f64, vsplat_f64)


@intrinsic
def vsplat_f64(typingctx, x):
    """A float64 vector with x in every lane."""
    vt = Vec(types.float64)

    def codegen(context, builder, sig, args):
        return _splat(context, builder, vt, context.cast(builder, args[0], sig.args[0], types.float64))

    return vt(x), codegen


@intrinsic
def vload_f64(typingctx, a, i):
    """The F64_LANES values a[i:i + F64_LANES] as a float64 vector (float32 ones widened exactly)."""
    vt = Vec(types.float64)

    def codegen(context, builder, sig, args):
        p = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        src = ir.VectorType(context.get_value_type(a.dtype), vt.width)
        v = builder.load(builder.bitcast(p, src.as_pointer()), align=a.dtype.bitwidth // 8)
        return v if a.dtype == types.float64 else builder.fpext(v, context.get_value_type(vt))

    return vt(a, i), codegen


def _binary(instruction):
    @intrinsic
    def op(typingctx, u, v):
        def codegen(context, builder, sig, args):
            return getattr(builder, instruction)(args[0], args[1])

        return u(u, v), codegen

    return op


vadd = _binary("fadd")
vsub = _binary("fsub")
vmul = _binary("fmul")


@intrinsic
def vhsum(typingctx, v):
    """The sum of v's lanes, in a fixed order: the upper half added to the lower half, lane by
    lane, until one lane is left (plain adds, the same order on every CPU)."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        x, n = args[0], v.width
        while n > 1:
            h = n // 2
            half = [ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(o, o + h))) for o in (0, h)]
            x = builder.fadd(builder.shuffle_vector(x, x, half[0]), builder.shuffle_vector(x, x, half[1]))
            n = h
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen


def _fmuladd(builder, args, bits):
    t = args[0].type
    name = f"llvm.fmuladd.v{t.count}f{bits}" if isinstance(t, ir.VectorType) else f"llvm.fmuladd.f{bits}"
    return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name), args)


@intrinsic
def vmuladd(typingctx, u, v, w):
    """u * v + w (llvm.fmuladd: one rounding where the CPU has FMA)."""

    def codegen(context, builder, sig, args):
        return _fmuladd(builder, args, u.dtype.bitwidth)

    return u(u, v, w), codegen


@intrinsic
def smuladd(typingctx, u, v, w):
    """vmuladd on three floats of one type: a scalar row computes what a vector lane computes."""
    if not (isinstance(u, types.Float) and u == v == w):
        return None

    def codegen(context, builder, sig, args):
        return _fmuladd(builder, args, u.bitwidth)

    return u(u, v, w), codegen


def _select(predicate):
    @intrinsic
    def op(typingctx, u, v, a, b):
        def codegen(context, builder, sig, args):
            return builder.select(builder.fcmp_ordered(predicate, args[0], args[1]), args[2], args[3])

        return a(u, v, a, b), codegen

    return op


# lane by lane: a where the ordered comparison of u and v holds, else b (a NaN lane takes b)
vselect_lt = _select("<")
vselect_le = _select("<=")
