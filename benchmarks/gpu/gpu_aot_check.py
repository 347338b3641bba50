"""Compile the int8 selection kernels for sm_90 without a GPU and report registers and stack.

Why: compiled Triton checks things its interpreter does not (e.g. a name whose type changes
inside a runtime ``if``), and a compile error found on the device machine costs device time.
This records the launches the selection would make at the benchmark's sizes (Llama-8B heads,
32k and 128k tokens, batch 1 / 8 / 64, K = 32 / 64 / 128; multi-launch with and without
programmatic dependent launches, and the one-launch shapes), compiles each distinct kernel
for sm_90 with the Triton wheel's ptxas, and prints its registers and stack bytes per thread
(``cuobjdump --dump-resource-usage``): heavy registers cap the programs per SM, a stack means
spills to local memory.

Run without ``TRITON_INTERPRET`` (the kernels must be JIT functions):
``python benchmarks/gpu/gpu_aot_check.py``. Exits 1 if a compile failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvhead.core.bounds.compact import CompactBounds, default_num_super
from kvhead.kernels.triton import select, select_hier, select_one
from kvhead.kernels.triton.select_hier import Plan
from kvhead.kernels.triton.select_one import OneShape

DTYPES = {
    torch.float32: "fp32",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bfloat16: "bf16",
}
PLANS = [
    Plan(),
    Plan(layout="one", one=OneShape(128, 256, mma=True, rank=False)),
    Plan(layout="one", one=OneShape(64, 256, mma=True, rank=False)),
]
KERNELS = [
    (select_hier, "_super_score_kernel"),
    (select_hier, "_select_kernel"),
    (select_hier, "_cand_kernel"),
    (select_hier, "_select_cand_kernel"),
    (select_one, "_one_kernel"),
]


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
            sig[p.name] = "i32" if -(2**31) <= int(v) < 2**31 else "i64"
    return sig, consts, kwargs.get("num_warps", 4)


def usage(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        Path(f.name).write_bytes(cubin)
        out = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return f"{regs.group(1) if regs else '?'} regs, stack {stack.group(1) if stack else '?'} B"


def record_sizes() -> list[Recorder]:
    """Run the selection on CPU tensors (zeros) with recorders in place of its kernels."""
    recorders = {}
    for module, name in KERNELS:
        fn = getattr(select, name) if name == "_select_kernel" else getattr(module, name)
        recorders[name] = Recorder(fn)
        setattr(module, name, recorders[name])
    head, dim, kv, q = 16, 128, 8, 32
    zeros = lambda *s: torch.zeros(*s, dtype=torch.int8)
    for ctx in (32768, 131072):
        for batch in (1, 8, 64):
            pages = ctx // head
            groups = pages // 8
            query = torch.zeros(batch, q, dim, dtype=torch.bfloat16)
            pb = CompactBounds(
                zeros(batch * pages, kv, dim),
                zeros(batch * pages, kv, dim),
                torch.zeros(batch * pages, kv),
            )
            sb = CompactBounds(
                zeros(batch, kv, groups, dim),
                zeros(batch, kv, groups, dim),
                torch.zeros(batch, kv, groups),
            )
            table = torch.zeros(batch, pages, dtype=torch.int32)
            num = torch.full((batch,), pages)
            for top_k in (32, 64, 128):
                for plan in PLANS if batch <= 8 else PLANS[:1]:
                    select_hier.hier_select(
                        query, pb, sb, table, num, top_k, 8, default_num_super(top_k), plan=plan
                    )
                    select_hier.flat_select(query, pb, table, num, top_k, plan=plan)
    return list(recorders.values())


def pdl_variants(kwargs: dict) -> list[dict]:
    """The recorded constants plus, where the kernel has them, the PDL-on variant (CPU runs
    record PDL off; the device compiles both)."""
    if "PDL" not in kwargs:
        return [kwargs]
    on = kwargs | {"PDL": True} | ({"PDL_WAIT": not kwargs["FLAT"]} if "PDL_WAIT" in kwargs else {})
    return [kwargs, on]


def main() -> int:
    cuobjdump = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    seen, failed = set(), 0
    calls = [
        (rec.fn, a, v) for rec in record_sizes() for a, k in rec.calls for v in pdl_variants(k)
    ]
    for fn, args, kwargs in calls:
        sig, consts, warps = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(consts.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        label = f"{fn.__name__} warps={warps} " + " ".join(
            f"{k}={v}" for k, v in consts.items() if k not in ("GROUP", "GP", "BLOCK_D")
        )
        try:
            kernel = triton.compile(
                ASTSource(fn, sig, consts), target=target, options={"num_warps": warps}
            )
            print(f"ok   {usage(kernel.asm['cubin'], cuobjdump)}  {label}")
        except Exception as exc:  # noqa: BLE001 - report every failing shape, then fail
            failed += 1
            print(f"FAIL {label}: {str(exc).splitlines()[-1] if str(exc) else exc!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
