"""Read SASS (``nvdisasm`` output of a cubin): loops, instruction mix, load bursts.

The static cost model (``benchmarks/static.py``) needs, per kernel build, how many instructions a
warp issues per iteration of each loop and of which kind (tensor-core, TMA/cp.async/vector
loads, fp32 ALU, shared loads, barriers), and how many bytes of global loads a warp can have in
flight before it must wait for one (Little's law). This module extracts exactly that from the
disassembly text; it knows nothing about the kernels.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

__all__ = ["parse", "analyze", "CATEGORIES", "classify"]

_INSTR = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)"
    r"(?P<rest>[^;]*);", re.M)
_LABEL = re.compile(r"^\s*(?P<label>\.L_x_\d+):", re.M)
_TARGET = re.compile(r"\.L_x_\d+")
_REG = re.compile(r"\bR(\d+)\b")

#: Instruction categories of the cost model, by opcode prefix (first match wins).
CATEGORIES = (
    ("tensor", ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "UTCMMA", "UTCHMMA")),
    ("tma", ("UTMALDG", "UTMASTG", "UTMAREDG", "UBLKCP", "UTMAPF", "UTMACCTL")),
    ("cp_async", ("LDGSTS",)),
    ("global_load", ("LDG",)),
    ("global_store", ("STG", "RED", "ATOMG")),
    ("shared_load", ("LDSM", "LDS")),
    ("shared_store", ("STS", "STSM")),
    ("local", ("LDL", "STL")),
    ("barrier", ("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "WARPSYNC", "MEMBAR", "ARRIVES",
                 "LDGDEPBAR", "FENCE")),
    ("fp32", ("FADD", "FFMA", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU", "FSWZADD")),
    ("convert", ("F2F", "F2FP", "I2F", "F2I", "HADD2", "HMUL2", "HFMA2", "PRMT")),
    ("branch", ("BRA", "BRX", "EXIT", "RET", "CALL", "BSYNC", "BSSY", "JMP")),
)


def classify(op: str) -> str:
    """The cost-model category of an opcode (``"other"`` for integer/address work)."""
    base = op.split(".")[0]
    for name, prefixes in CATEGORIES:
        if any(base.startswith(p) for p in prefixes):
            return name
    return "other"


def _load_bytes(op: str) -> int:
    # bytes per lane of a global load (LDG/LDGSTS): .128 -> 16, .64 -> 8, 16/8-bit -> 2/1
    if ".128" in op:
        return 16
    if ".64" in op:
        return 8
    if ".U16" in op or ".S16" in op:
        return 2
    if ".U8" in op or ".S8" in op:
        return 1
    return 4


def parse(sass: str) -> List[Dict]:
    """Instructions in address order: ``{addr, op, pred, operands, target}``.

    ``target`` is the address a branch jumps to (None for other instructions).
    """
    labels = {}
    pending = []
    instrs = []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group("label"))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr = int(m.group("addr"), 16)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append(dict(addr=addr, op=m.group("op"), pred=(m.group("pred") or "").strip(),
                           operands=m.group("rest").strip(), target=None))
    for ins in instrs:
        if ins["op"].startswith(("BRA", "JMP")):
            t = _TARGET.search(ins["operands"])
            if t and t.group(0) in labels:
                ins["target"] = labels[t.group(0)]
    return instrs


def _mix(instrs) -> Dict[str, int]:
    mix: Dict[str, int] = {}
    for ins in instrs:
        c = classify(ins["op"])
        mix[c] = mix.get(c, 0) + 1
    return mix


def _load_bytes_per_lane(instrs) -> int:
    return sum(_load_bytes(i["op"]) for i in instrs
               if classify(i["op"]) in ("global_load", "cp_async"))


def _bursts(instrs) -> List[int]:
    """Global-load bytes per lane of each burst: loads issued before a loaded register is read.

    A warp keeps loading until an instruction needs a register one of those loads writes; the
    bytes issued by then are what it has in flight (cp.async copies count until a
    ``LDGDEPBAR``/``DEPBAR`` wait). Branch targets end a burst.
    """
    bursts: List[int] = []
    cur = 0
    pending: set = set()
    targets = {i["target"] for i in instrs if i["target"] is not None}
    for ins in instrs:
        op = ins["op"]
        c = classify(op)
        if ins["addr"] in targets and cur:
            bursts.append(cur)
            cur, pending = 0, set()
        regs = [int(r) for r in _REG.findall(ins["operands"])]
        if c == "global_load":
            srcs = regs[1:]
        elif c in ("global_store", "shared_store", "branch", "barrier", "cp_async"):
            srcs = regs
        else:
            srcs = regs[1:]
        if cur and (pending and any(r in pending for r in srcs) or op.startswith("DEPBAR")):
            bursts.append(cur)
            cur, pending = 0, set()
        if c in ("global_load", "cp_async"):
            nbytes = _load_bytes(op)
            cur += nbytes
            if c == "global_load" and regs:
                pending.update(range(regs[0], regs[0] + max(1, nbytes // 4)))
    if cur:
        bursts.append(cur)
    return bursts


def _burst_stats(instrs) -> Dict[str, float]:
    b = _bursts(instrs)
    return dict(max_load_burst_per_lane=max(b, default=0),
                mean_load_burst_per_lane=(sum(b) / len(b)) if b else 0.0, load_bursts=len(b))


def analyze(sass: str, function: Optional[str] = None) -> Dict:
    """Static statistics of one kernel's SASS.

    Returns ``instructions`` (static count), ``mix`` (per category), ``load_bytes_per_lane``,
    the load bursts (``max_``/``mean_load_burst_per_lane``, ``load_bursts``: see
    :func:`_bursts`) and ``loops``: one entry per backward branch (innermost loops
    have no other loop inside), each with its address range, static ``instructions`` and
    ``mix`` of one iteration, ``load_bytes_per_lane`` and ``innermost``; plus ``outside``: the
    mix of instructions in no loop.
    """
    instrs = parse(sass)
    # loops: backward branches. An unconditional backward branch that jumps from outside a
    # loop into its middle is the return of an out-of-line block (ptxas puts mbarrier retry
    # spins after the loop body), not a loop of its own.
    back = [i for i in instrs if i["target"] is not None and i["target"] <= i["addr"]]
    conditional = [(i["target"], i["addr"]) for i in back if i["pred"]]

    def crosses(t, a):
        return any(s0 < t <= e0 < a for s0, e0 in conditional)
    loops = []
    for ins in back:
        t = ins["target"]
        if not ins["pred"] and crosses(t, ins["addr"]):
            continue
        body = [i for i in instrs if t <= i["addr"] <= ins["addr"]]
        loops.append(dict(start=t, end=ins["addr"], instructions=len(body),
                          mix=_mix(body), load_bytes_per_lane=_load_bytes_per_lane(body),
                          **_burst_stats(body)))
    for lp in loops:
        lp["innermost"] = not any(o is not lp and lp["start"] <= o["start"] and
                                  o["end"] <= lp["end"] and (o["start"], o["end"]) !=
                                  (lp["start"], lp["end"]) for o in loops)
    in_loop = set()
    for lp in loops:
        in_loop.update(range(lp["start"], lp["end"] + 1))
    outside = [i for i in instrs if i["addr"] not in in_loop]
    return dict(instructions=len(instrs), mix=_mix(instrs),
                load_bytes_per_lane=_load_bytes_per_lane(instrs), **_burst_stats(instrs),
                loops=loops,
                outside=dict(instructions=len(outside), mix=_mix(outside),
                             load_bytes_per_lane=_load_bytes_per_lane(outside)))
