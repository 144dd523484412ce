"""What a compiled step costs per device: memory (XLA's buffer assignment) and collectives (the optimised HLO).

Both read the executable that actually runs, so they show what XLA did with the sharding rules, not what the
rules intended: an unexpected all-gather or a replicated temporary shows up here first.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
# `%name = shape opcode(operands), attributes`; a tuple shape holds spaces, so the opcode is found by pattern.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")


def memory_per_device(compiled) -> dict[str, int]:
    """Bytes per device of the compiled step: arguments, outputs, temporaries, and their peak.

    Donated arguments that alias outputs are counted once (XLA reuses their buffers), so
    peak = arguments + outputs - aliased + temporaries.
    """
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _shape_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape (one entry per tuple element)."""
    sizes = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            sizes.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return sizes


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    calls: str | None  # a fusion's computation
    index: int | None  # a parameter's number, or a get-tuple-element's tuple index


def _parse(hlo: str) -> tuple[dict[str, _Instr], dict[str, list[_Instr]], dict[str, list[_Instr]]]:
    """Instructions by name, the users of each instruction, and the parameters of each computation."""
    instrs: dict[str, _Instr] = {}
    users: dict[str, list[_Instr]] = collections.defaultdict(list)
    params: dict[str, list[_Instr]] = collections.defaultdict(list)
    computation = ""
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        args, _, attrs = rest.partition(")")
        calls = re.search(r"calls=%([\w.\-]+)", attrs)
        index = re.search(r"index=(\d+)", attrs) if opcode == "get-tuple-element" else None
        if opcode == "parameter":
            index = re.match(r"\s*(\d+)", args)
        ins = _Instr(name, shape, opcode, re.findall(r"%([\w.\-]+)", args), calls.group(1) if calls else None,
                     int(index.group(1)) if index else None)
        instrs[name] = ins
        if opcode == "parameter":
            params[computation].append(ins)
        for op in ins.operands:
            users[op].append(ins)
    return instrs, users, params


def _only_sliced(name: str, users, params, depth: int = 0) -> bool:
    """True if every use of `name` keeps just a dynamic slice of it (through get-tuple-element, bitcast, copy,
    and into fusions whose matching parameter is only dynamic-sliced)."""
    uses = users.get(name, [])
    if not uses or depth > 6:
        return False
    for u in uses:
        if u.opcode == "dynamic-slice" and u.operands[0] == name:
            continue
        if u.opcode in ("get-tuple-element", "bitcast", "copy"):
            if _only_sliced(u.name, users, params, depth + 1):
                continue
            return False
        if u.opcode == "fusion" and u.calls:
            inner = [p for p in params.get(u.calls, []) if p.index == u.operands.index(name)]
            if inner and _only_sliced(inner[0].name, users, params, depth + 1):
                continue
        return False
    return True


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Count and bytes of each collective in optimised HLO text (`compiled.as_text()`).

    Bytes are those of the full (unsharded) side: an all-reduce's or reduce-scatter's operand, an all-gather's
    result, an all-to-all's operand. Async pairs count once (at `-start`). XLA's CPU backend writes a
    reduce-scatter as an all-reduce whose result is only ever dynamic-sliced to each device's shard (GPU and TPU
    fuse the pair into a reduce-scatter op); such all-reduce elements are reported as reduce-scatter.
    """
    instrs, users, params = _parse(hlo)
    stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for ins in instrs.values():
        kind = ins.opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        sizes = _shape_bytes(ins.shape)
        if ins.opcode.endswith("-start") and sizes:
            sizes = [max(sizes)]  # async shapes repeat the operand next to the result
        if kind == "all-reduce" and not ins.opcode.endswith("-start"):
            if ins.shape.startswith("("):  # a combined all-reduce: each tuple element has its own users
                scattered = {u.index for u in users.get(ins.name, [])
                             if u.opcode == "get-tuple-element" and _only_sliced(u.name, users, params)}
            else:
                scattered = {0} if _only_sliced(ins.name, users, params) else set()
            rs_bytes = sum(sizes[i] for i in scattered if i < len(sizes))
            if scattered:
                stats["reduce-scatter"]["count"] += 1
                stats["reduce-scatter"]["bytes"] += rs_bytes
            if len(scattered) < len(sizes):
                stats["all-reduce"]["count"] += 1
                stats["all-reduce"]["bytes"] += sum(sizes) - rs_bytes
            continue
        stats[kind]["count"] += 1
        stats[kind]["bytes"] += sum(sizes)
    return stats

