"""Every Triton kernel variant compiles for Hopper (sm_90), without a GPU.

The interpreter runs kernels as NumPy code and accepts programs the GPU compiler rejects, so the
kernels are also compiled ahead of time to PTX for sm_90, as the JIT would specialise them for
aligned tensors, and the PTX is checked for what the design relies on: wgmma tensor-core
instructions in the GEMMs and 128-bit global loads/stores in the row kernels. It runs in a
subprocess because TRITON_INTERPRET must be unset when the kernels are defined.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from kernels_naive import HAS_TRITON

SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from foldmesh.kernels import _gather, _grouped_gemm, _swiglu

INDEX_PTRS = {"copy_ptr": "*i64", "row_map_ptr": "*i64", "offs_ptr": "*i32"}
FP32_PTRS = {"scale_ptr", "weight_ptr", "dot_ptr", "p_ptr", "dp_ptr"}

def ptx(kernel, dtype, constexprs, num_warps=4):
    jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {}
    for name in jit.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = INDEX_PTRS.get(name, "*fp32" if name in FP32_PTRS else "*" + dtype)
        else:
            signature[name] = "i32"
    index = {name: (i,) for i, name in enumerate(jit.arg_names)}
    # What the JIT assumes for 16-byte aligned pointers and sizes divisible by 16.
    attrs = {index[n]: [["tt.divisibility", 16]] for n, t in signature.items() if t != "constexpr"}
    source = ASTSource(fn=jit, signature=signature, attrs=attrs,
                       constexprs={index[n]: v for n, v in constexprs.items()})
    options = dict(num_warps=num_warps, num_stages=3)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

wide = re.compile(r"(ld|st)\.global[.\w]*\.v4")
for dtype, size in (("bf16", 2), ("fp32", 4)):
    block, warps = _gather.row_block(16384, size)  # the launchers' choice for a wide row
    for scale, dot in ((False, False), (True, False), (True, True)):
        code = ptx(_gather._gather_rows_kernel, dtype,
                   dict(TOPK=2, HAS_SCALE=scale, HAS_DOT=dot, BLOCK_H=block), warps)
        assert len(set(m.group(1) for m in wide.finditer(code))) == 2, ("gather_rows", dtype)
    code = ptx(_gather._gather_sum_kernel, dtype,
               dict(TOPK=8, HAS_WEIGHT=True, BLOCK_H=block), warps)
    assert len(set(m.group(1) for m in wide.finditer(code))) == 2, ("gather_sum", dtype)
    for has_probs in (False, True):
        ptx(_swiglu._swiglu_fwd_kernel, dtype, dict(HAS_PROBS=has_probs, BLOCK_F=block), warps)
        ptx(_swiglu._swiglu_bwd_kernel, dtype, dict(HAS_PROBS=has_probs, BLOCK_F=block), warps)
    flags = dict(PRECISION="tf32", DOT_FP32=False)
    code = ptx(_grouped_gemm._grouped_gemm_kernel, dtype, dict(
        GROUPS_POW2=16, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, **flags), num_warps=8)
    assert "wgmma" in code, ("grouped_gemm", dtype)
    code = ptx(_grouped_gemm._grouped_wgrad_kernel, dtype, dict(
        BLOCK_K=128, BLOCK_N=256, BLOCK_R=64, **flags), num_warps=8)
    assert "wgmma" in code, ("grouped_wgrad", dtype)
print("compiled")
"""


def _has_nvidia_backend() -> bool:
    if not HAS_TRITON:
        return False
    from triton.backends import backends

    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
