"""Compile the int8 selection kernels for sm_90 without a GPU and report registers and spills.

Why: compiled Triton checks things its interpreter does not (e.g. a name whose type changes
inside a runtime ``if``), and a compile error found on the device machine costs device time.
This records the launches the selection would make at the benchmark's sizes (Llama-8B heads,
8k-128k tokens, batch 1 / 8 / 64, K = 32 / 64 / 128), compiles each distinct kernel for
sm_90 with the Triton wheel's ptxas, and prints its registers and spill bytes per thread
(``cuobjdump --dump-resource-usage``): heavy registers cap the programs per SM.

Run without ``TRITON_INTERPRET`` (the kernels must be JIT functions):
``PYTHONPATH=. python benchmarks/gpu_aot_check.py``. Exits 1 if a compile failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvhead.bounds_compact import CompactBounds, default_num_super
from kvhead.kernels import select_hier, select_two
from kvhead.kernels.select_hier import Plan
from kvhead.kernels.select_two import TwoShape

DTYPES = {torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64",
          torch.bfloat16: "bf16"}
SHAPES = {"two t128 c64 w8": TwoShape(), "two t128 c128 w8": TwoShape(tile_c=128),
          "two t64 c64 w4": TwoShape(tile=64, warps=4, warps_c=4)}


class Recorder:
    """Stands in for a JIT kernel: records ``kernel[grid](*args, **kwargs)`` calls."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, int]:
    sig, consts = {}, {}
    values = dict(zip(fn.arg_names, args)) | kwargs
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        else:
            sig[p.name] = "i32" if -2**31 <= int(v) < 2**31 else "i64"
    return sig, consts, kwargs.get("num_warps", 4)


def usage(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        Path(f.name).write_bytes(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return f"{regs.group(1) if regs else '?'} regs, stack {stack.group(1) if stack else '?'} B"


def record_sizes() -> list[Recorder]:
    """Run the two-launch selection on CPU tensors with recorders in place of its kernels.
    Batch changes only the grid, not the compiled kernel, so batch 1 covers every size."""
    recorders = {name: Recorder(getattr(select_two, name))
                 for name in ("_super_top_kernel", "_cand_top_kernel")}
    for name, rec in recorders.items():
        setattr(select_two, name, rec)
    head, dim, kv, q = 16, 128, 8, 32
    for ctx in (32768, 131072):
        pages = ctx // head
        groups = pages // 8
        query = torch.zeros(1, q, dim, dtype=torch.bfloat16)
        zeros = lambda *s: torch.zeros(*s, dtype=torch.int8)
        pb = CompactBounds(zeros(pages, kv, dim), zeros(pages, kv, dim), torch.zeros(pages, kv))
        sb = CompactBounds(zeros(1, kv, groups, dim), zeros(1, kv, groups, dim),
                           torch.zeros(1, kv, groups))
        table = torch.zeros(1, pages, dtype=torch.int32)
        for top_k in (32, 64, 128):
            for shape in SHAPES.values():
                select_hier.hier_select(query, pb, sb, table, torch.tensor([pages]), top_k, 8,
                                        default_num_super(top_k), plan=Plan("two", two=shape))
    return list(recorders.values())


def main() -> int:
    cuobjdump = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    seen, failed = set(), 0
    calls = [(rec.fn, a, k | {"PDL": pdl}) for rec in record_sizes() for a, k in rec.calls
             for pdl in (False, True)]  # CPU records PDL off; compile the CUDA variant too
    for fn, args, kwargs in calls:
        sig, consts, warps = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(consts.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} warps={warps} " + " ".join(
            f"{k}={v}" for k, v in consts.items() if k not in ("GROUP", "GP", "BLOCK_D"))
        try:
            kernel = triton.compile(ASTSource(fn, sig, consts), target=target,
                                    options={"num_warps": warps})
            print(f"ok   {usage(kernel.asm['cubin'], cuobjdump)}  {label}")
        except Exception as exc:  # report every failing shape, then fail
            failed += 1
            print(f"FAIL {label}: {str(exc).splitlines()[-1] if str(exc) else exc!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
