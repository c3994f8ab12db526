"""Tensor cores and asynchronous copies from Numba: a few PTX instructions as Numba intrinsics.

Numba CUDA has no API for ``mma.sync``, ``ldmatrix`` or ``cp.async``, but an ``@intrinsic`` can
emit LLVM inline assembly, which NVVM passes through to PTX. Each helper below is one PTX
instruction (plus the address conversions it needs); the decode kernel's v4 is written with
them and stays ordinary Numba otherwise. Not for the CUDA simulator.

    mma_m16n8k16(kind, a0..a3, b0, b1, c0..c3) -> (d0..d3)   D = A B + C, fp32 accumulate
        A 16x16 row-major (4 regs of 2 x 16-bit), B 16x8 "col" (2 regs), C/D 16x8 fp32.
        Fragment of lane l (g = l // 4, t = l % 4):  a0 = A[g][2t:2t+2], a1 = A[g+8][2t:2t+2],
        a2 = A[g][2t+8:2t+10], a3 = A[g+8][2t+8:2t+10];  b0 = B[2t:2t+2][g], b1 = B[2t+8:2t+10][g];
        c0, c1 = C[g][2t:2t+2], c2, c3 = C[g+8][2t:2t+2].
    ldmatrix_x4(addr) / ldmatrix_x4_trans(addr) -> 4 regs   four 8x8 16-bit matrices from shared
        memory; lane l gives the address of row l % 8 of matrix l // 8 (16 contiguous bytes).
    shared_address(arr) -> uint32     the shared-window address of a shared array's first byte
    cp_async_16(dst, src_array, src_index, nbytes)   16 bytes global -> shared, bypassing registers
        and L1; nbytes = 0 writes zeros and reads nothing (how out-of-range keys are skipped).
    cp_async_wait_all()               commit the outstanding copies and wait for all of them
    pack2(kind, lo, hi) -> uint32     two fp32 -> bf16x2 / f16x2, round to nearest even
"""

from __future__ import annotations

from numba import types
from numba.core.extending import intrinsic

_MMA = {
    "bf16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
}
_CVT = {"bf16": "cvt.rn.bf16x2.f32", "f16": "cvt.rn.f16x2.f32"}


def _ir():
    from llvmlite import ir

    return ir


def _make_mma(kind):
    opcode = _MMA[kind]

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        u, f = types.uint32, types.float32
        sig = types.UniTuple(f, 4)(u, u, u, u, u, u, f, f, f, f)

        def codegen(context, builder, signature, args):
            ir = _ir()
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            res = builder.asm(fty, opcode + " {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
                              "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", args, False)
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(res, k) for k in range(4)])

        return sig, codegen

    return mma


def _make_pack(kind):
    opcode = _CVT[kind]

    @intrinsic
    def pack2(typingctx, lo, hi):
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            ir = _ir()
            fty = ir.FunctionType(ir.IntType(32), [ir.FloatType(), ir.FloatType()])
            # cvt.rn.bf16x2.f32 d, a, b puts a in the upper half: the higher column goes first
            return builder.asm(fty, opcode + " $0, $1, $2;", "=r,f,f", [args[1], args[0]], False)

        return sig, codegen

    return pack2


mma_bf16, mma_f16 = _make_mma("bf16"), _make_mma("f16")
pack2_bf16, pack2_f16 = _make_pack("bf16"), _make_pack("f16")
MMA = {"bf16": mma_bf16, "f16": mma_f16}
PACK2 = {"bf16": pack2_bf16, "f16": pack2_f16}


def _make_ldmatrix(trans):
    opcode = "ldmatrix.sync.aligned.m8n8.x4" + (".trans" if trans else "") + ".shared.b16"

    @intrinsic
    def ldmatrix(typingctx, addr):
        u = types.uint32
        sig = types.UniTuple(u, 4)(u)

        def codegen(context, builder, signature, args):
            ir = _ir()
            i32 = ir.IntType(32)
            fty = ir.FunctionType(ir.LiteralStructType([i32] * 4), [i32])
            res = builder.asm(fty, opcode + " {$0,$1,$2,$3}, [$4];", "=r,=r,=r,=r,r,~{memory}", args, True)
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(res, k) for k in range(4)])

        return sig, codegen

    return ldmatrix


ldmatrix_x4 = _make_ldmatrix(False)
ldmatrix_x4_trans = _make_ldmatrix(True)


@intrinsic
def shared_address(typingctx, arr):
    """uint32 shared-window address of arr's data (arr a cuda.shared.array)."""
    sig = types.uint32(arr)

    def codegen(context, builder, signature, args):
        ir = _ir()
        ptr = context.make_array(signature.args[0])(context, builder, args[0]).data
        if ptr.type.addrspace == 3:
            return builder.ptrtoint(ptr, ir.IntType(32))
        generic = builder.ptrtoint(ptr, ir.IntType(64))
        shared = builder.asm(ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), "cvta.to.shared.u64 $0, $1;",
                             "=l,l", [generic], False)
        return builder.trunc(shared, ir.IntType(32))

    return sig, codegen


@intrinsic
def cp_async_16(typingctx, dst, src, index, nbytes):
    """cp.async 16 bytes from src.flat[index] (C-contiguous array) to shared address dst."""
    sig = types.void(types.uint32, src, types.int64, types.uint32)

    def codegen(context, builder, signature, args):
        ir = _ir()
        ary = context.make_array(signature.args[1])(context, builder, args[1])
        ptr = builder.ptrtoint(builder.gep(ary.data, [args[2]]), ir.IntType(64))
        fty = ir.FunctionType(ir.VoidType(), [ir.IntType(32), ir.IntType(64), ir.IntType(32)])
        builder.asm(fty, "{ .reg .u64 g; cvta.to.global.u64 g, $1; cp.async.cg.shared.global [$0], [g], 16, $2; }",
                    "r,l,r,~{memory}", [args[0], ptr, args[3]], True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cp_async_wait_all(typingctx):
    """Commit this thread's outstanding cp.async copies and wait until all have landed."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        ir = _ir()
        builder.asm(ir.FunctionType(ir.VoidType(), []), "cp.async.commit_group; cp.async.wait_group 0;",
                    "~{memory}", [], True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cp_async_commit(typingctx):
    """Close the current group of cp.async copies (waited for by a later cp_async_wait_all)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        ir = _ir()
        builder.asm(ir.FunctionType(ir.VoidType(), []), "cp.async.commit_group;", "~{memory}", [], True)
        return context.get_dummy_value()

    return sig, codegen
