"""The GPU compile gate's rules and numbers, without Triton (imported by
benchmarks/gpu_compile_report.py and by tests/test_gpu_compile.py)."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("kernels/_common.py", "kernels/attention_triton.py", "kernels/ipot_triton.py",
           "csrc/ipot_cuda.cu", "csrc/ipot_cuda.h")
ARCHS: Dict[int, Dict[str, Any]] = {
    # per-SM limits (CUDA programming guide, compute capability tables)
    90: dict(name="sm_90 (Hopper, H100/H200)", regs=65536, max_warps=64, max_blocks=32,
             smem_sm=228 * 1024, smem_block=227 * 1024),
    80: dict(name="sm_80 (Ampere, A100)", regs=65536, max_warps=64, max_blocks=32,
             smem_sm=164 * 1024, smem_block=163 * 1024),
}
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, int]:
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    smem = _PTXAS_SMEM.findall(log)
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {"registers": int(regs[-1]),
            "spill_stores": sum(int(s) for s, _ in spill),
            "spill_loads": sum(int(l) for _, l in spill),
            "static_smem": int(smem[-1]) if smem else 0}


def occupancy(arch: int, registers: int, smem: int, warps: int) -> Dict[str, Any]:
    a = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    limits = {"warps": a["max_warps"] // warps, "blocks": a["max_blocks"],
              "registers": (a["regs"] // per_warp) // warps if per_warp else a["max_blocks"],
              "shared memory": a["smem_sm"] // (smem + 1024)}
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / a["max_warps"],
            "limited_by": min(limits, key=lambda k: (limits[k], k != "registers"))}


def failures(rows: List[Dict[str, Any]]) -> List[str]:
    out = []
    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r.get('dtype', '')} {r.get('config', '')}"
        if r["status"] != "ok":
            out.append(f"{what}: {r.get('error', 'failed')}")
            continue
        if r["pickable"] and (r["spill_stores"] or r["spill_loads"]):
            out.append(f"{what}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                       f"in a config autotune may pick")
        if r["smem_bytes"] > ARCHS[int(r["arch"][3:5])]["smem_block"]:
            out.append(f"{what}: {r['smem_bytes']} B shared memory > the SM's per-block limit")
    return out


def sources_digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()
