"""Read the cross-program memory ordering of a kernel's PTX, as the JIT built it.

The pipelined path and the stream-K GEMM synchronize programs through global memory (the
helper publishes units of A that other SMs' TMA loads read; a stream-K piece publishes its
fp32 partial tile for the tile's reducer). Their correctness argument (``docs/DESIGN.md``
§5.2, §4) needs, in the code that runs:

* **publish**: every thread's stores happen before the CTA barrier, the barrier before the
  ``release`` that makes them visible at GPU scope;
* **consume by TMA**: after an ``acquire`` (or the CTA's own generic stores), a
  ``fence.proxy.async`` and a CTA barrier before any TMA load: the data were written through
  the generic proxy, TMA reads through the async proxy, and the acquiring thread need not be
  the one that issues the copy;
* **scope**: every strong operation (``.relaxed``/``.acquire``/``.release``/``.acq_rel``) at
  GPU (or system) scope: a CTA-scope acquire synchronizes with nobody on another SM.

Triton's lowering and LLVM decide where those instructions land. This module checks them on
the PTX by dataflow over its control-flow graph (every path, not the text's order), so a
compiler that drops a fence, weakens a semantic or moves a load ahead of its fence fails the
ahead-of-time builds (``triton_aot --check``, ``tests/test_aot_compile.py``, ``.ci/aot36``)
before any GPU runs it. What it cannot check is the argument itself (which counts a program
waits on, that no wait depends on a program that has not started): the interpreter tests do
that, and only a GPU run checks the hardware.

TMA *stores* (``cp.async.bulk.tensor`` to global) are not treated as published data: the
kernels store only their outputs that way, which no program of the launch reads.
"""

from __future__ import annotations

import re
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

__all__ = ["EVENTS", "statements", "classify", "audit", "PROTOCOLS", "protocol_problems"]

#: The events :func:`classify` reports (the counts of :func:`audit`).
EVENTS = ("acquire", "release", "proxy_fence", "barrier", "tma_load", "tma_store", "store",
          "load", "nc_load", "weak_scope")

_STRONG = re.compile(r"\.(relaxed|acquire|release|acq_rel)\b")
_SCOPE_OK = re.compile(r"\.(gpu|sys)\b")
_LABEL = re.compile(r"^([A-Za-z_$][A-Za-z0-9_$]*):\s*(.*)$")
_PRED = re.compile(r"^@!?%?[A-Za-z_$][A-Za-z0-9_$]*\s+")
_BRANCH = re.compile(r"^bra(\.uni)?\s+([A-Za-z_$][A-Za-z0-9_$]*)\s*$")


def classify(op: str) -> List[str]:
    """The events of one PTX instruction (its text without predicate and ``;``).

    ``acquire``: a load or atomic with ``.acquire``/``.acq_rel``; ``release``: a store,
    reduction or atomic with ``.release``/``.acq_rel`` (an ``acq_rel`` atomic is both);
    ``proxy_fence``: ``fence.proxy.async`` for global memory (``.global`` or every state space,
    not ``.shared::*``); ``barrier``: a CTA barrier (``bar.sync``/``bar.red``/
    ``barrier.sync``; not ``bar.warp.sync`` nor ``bar.arrive``); ``tma_load`` /
    ``tma_store``: a bulk (TMA) copy from / to global memory; ``store``: a weak generic store
    to global memory; ``load``: a weak generic load from global memory (``ld.global``, and
    ``cp.async`` to shared memory), ``nc_load`` too where it takes the non-coherent path
    (``.nc``); ``weak_scope``: a strong operation at CTA or cluster scope.
    """
    opcode = (op.split() or [""])[0]
    parts = opcode.split(".")
    base = parts[0]
    ev: List[str] = []
    strong = _STRONG.search(opcode)
    if strong and base in ("ld", "st", "atom", "red", "fence") and not _SCOPE_OK.search(opcode):
        ev.append("weak_scope")
    if strong and base in ("ld", "atom") and strong.group(1) in ("acquire", "acq_rel"):
        ev.append("acquire")
    if strong and base in ("st", "atom", "red") and strong.group(1) in ("release", "acq_rel"):
        ev.append("release")
    if opcode in ("fence.proxy.async", "fence.proxy.async.global"):
        ev.append("proxy_fence")
    if (base in ("bar", "barrier") and len(parts) > 1
            and (parts[1] in ("sync", "red") or parts[1:3] in (["cta", "sync"], ["cta", "red"]))):
        ev.append("barrier")
    if opcode.startswith("cp.async.bulk") and not opcode.startswith("cp.async.bulk.prefetch"):
        # the destination's state space comes first: .shared::cta/.shared::cluster.global is a
        # load, .global.shared::cta a store
        spaces = [p for p in parts if p.startswith(("shared", "global"))]
        if spaces[:2] and spaces[0].startswith("shared") and spaces[1] == "global":
            ev.append("tma_load")
        elif spaces[:1] == ["global"]:
            ev.append("tma_store")
    if base == "st" and len(parts) > 1 and parts[1] == "global" and not strong:
        ev.append("store")
    if (base == "ld" and len(parts) > 1 and parts[1] == "global" and not strong) or \
            opcode.startswith(("cp.async.ca.shared", "cp.async.cg.shared")):
        ev.append("load")
        if "nc" in parts:
            ev.append("nc_load")
    return ev


def _body(ptx: str, entry: Optional[str]) -> Tuple[str, List[str]]:
    # the lines of one ``.entry`` body (the first, or the one named ``entry``), and its name
    m = next((m for m in re.finditer(r"\.entry\s+([A-Za-z_$][A-Za-z0-9_$]*)\s*\(", ptx)
              if entry is None or m.group(1) == entry), None)
    if m is None:
        raise ValueError("no .entry in the PTX" if entry is None else
                         f"no .entry {entry} in the PTX")
    lines = ptx[m.end():].splitlines()
    depth, start, out = 0, None, []
    for i, line in enumerate(lines):
        s = line.split("//")[0].strip()
        if s == "{":
            depth += 1
            if start is None:
                start = i
                continue
        elif s == "}":
            depth -= 1
            if depth == 0:
                return m.group(1), out
        if start is not None:
            out.append(line)
    raise ValueError(f"unterminated body of .entry {m.group(1)}")


def statements(ptx: str, entry: Optional[str] = None) -> Tuple[str, List[Tuple[str, str]]]:
    """The statements of a kernel body in order: ``(kind, text)`` with kind ``label``,
    ``branch`` (text: ``"<target> <cond>"``, cond ``always`` or ``maybe``), ``exit``
    (``always``/``maybe``) or ``op`` (the instruction without its predicate).

    Labels inside inline-assembly scopes (``{ ... }`` blocks, e.g. the ``waitLoop`` of an
    mbarrier wait, which repeats in every such block) are renamed by scope, so each branch
    finds its own.
    """
    name, lines = _body(ptx, entry)
    # first pass: the statements with their scope stacks, and which labels each scope defines
    n_scopes = 0
    defined: Dict[int, Set[str]] = {0: set()}
    pending: List[Tuple[Tuple[int, ...], bool, str]] = []  # (scopes, is a label, text)
    stack = [0]
    for line in lines:
        text = line.split("//")[0].strip()
        if not text:
            continue
        if text == "{":
            n_scopes += 1
            stack.append(n_scopes)
            defined[n_scopes] = set()
            continue
        if text == "}":
            stack.pop()
            continue
        for stmt in text.split(";"):
            stmt = stmt.strip()
            while stmt:
                lm = _LABEL.match(stmt)
                if lm and not stmt.startswith("."):
                    defined[stack[-1]].add(lm.group(1))
                    pending.append((tuple(stack), True, lm.group(1)))
                    stmt = lm.group(2).strip()
                    continue
                pending.append((tuple(stack), False, stmt))
                break

    def resolve(stack_t, label):
        for sc in reversed(stack_t):
            if label in defined[sc]:
                return f"{sc}:{label}"
        raise ValueError(f"{name}: branch to an undefined label {label}")

    out: List[Tuple[str, str]] = []
    for stack_t, is_label, stmt in pending:
        if is_label:
            out.append(("label", resolve(stack_t, stmt)))
            continue
        if stmt.startswith("."):
            continue  # directives: .reg, .loc, .pragma, ...
        pm = _PRED.match(stmt)
        cond = "maybe" if pm else "always"
        op = stmt[pm.end():] if pm else stmt
        if op.startswith("brx"):
            raise ValueError(f"{name}: indirect branch ({op}): no control-flow graph")
        bm = _BRANCH.match(op)
        if bm:
            out.append(("branch", f"{resolve(stack_t, bm.group(2))} {cond}"))
        elif op.split()[0] in ("ret", "exit", "trap"):
            out.append(("exit", cond))
        else:
            out.append(("op", op))
    return name, out


#: the dataflow's facts: what a path may still owe at a point
_NEED_BARRIER_BEFORE_RELEASE = "store->barrier"  # a generic store since the last barrier
_NEED_FENCE = "needs proxy fence"  # an acquire or generic store since the last proxy fence
_NEED_BARRIER_FOR_TMA = "needs barrier"  # ... since the last CTA barrier
_NEED_BARRIER_FOR_LOAD = "acquire->barrier"  # an acquire since the last CTA barrier
_ACQUIRED = "acquired"  # an acquire on the way here (never forgotten)


def _transfer(facts: FrozenSet[str], events: Sequence[str]) -> FrozenSet[str]:
    f = set(facts)
    if "proxy_fence" in events:
        f.discard(_NEED_FENCE)
    if "barrier" in events:
        f.discard(_NEED_BARRIER_BEFORE_RELEASE)
        f.discard(_NEED_BARRIER_FOR_TMA)
        f.discard(_NEED_BARRIER_FOR_LOAD)
    if "acquire" in events:
        f.update((_NEED_FENCE, _NEED_BARRIER_FOR_TMA, _NEED_BARRIER_FOR_LOAD, _ACQUIRED))
    if "store" in events:
        f.update((_NEED_BARRIER_BEFORE_RELEASE, _NEED_FENCE, _NEED_BARRIER_FOR_TMA))
    return frozenset(f)


#: what :func:`audit` reports: (key, the event checked, the facts of which any one on some
#: path to it is a break)
_CHECKS = (
    ("unbarriered_releases", "release", frozenset((_NEED_BARRIER_BEFORE_RELEASE,))),
    ("unfenced_tma_loads", "tma_load", frozenset((_NEED_FENCE, _NEED_BARRIER_FOR_TMA))),
    ("unbarriered_loads", "load", frozenset((_NEED_BARRIER_FOR_LOAD,))),
    ("nc_loads_after_acquire", "nc_load", frozenset((_ACQUIRED,))),
)


def audit(ptx: str, entry: Optional[str] = None) -> Dict:
    """The memory-ordering facts of one kernel's PTX (the first ``.entry``, or ``entry``).

    Returns ``kernel``; ``counts`` (instructions per event of :data:`EVENTS`); and the
    instructions (``"#<statement index> <text>"``) on some path of which:

    * ``unbarriered_releases``: a ``release`` follows a generic global store with no CTA
      barrier between (another thread's store need not be visible with it);
    * ``unfenced_tma_loads``: a TMA load follows an ``acquire`` or a generic global store
      without both a ``fence.proxy.async`` (global) and a CTA barrier after it;
    * ``unbarriered_loads``: a generic global load follows an ``acquire`` with no CTA
      barrier between (the acquire is one lane's; the other threads see what it ordered only
      through the barrier);
    * ``nc_loads_after_acquire``: a non-coherent (``.nc``) load follows an ``acquire`` (that
      path may return data older than what the acquire ordered);
    * ``weak_scope``: strong operations at CTA or cluster scope.

    Which of these a kernel must be free of is :func:`protocol_problems`' business: a TMA load
    after an acquire is harmless where the TMA never reads what other programs wrote.
    """
    name, stmts = statements(ptx, entry)
    # basic blocks: start at labels and after branches / exits
    blocks: List[List[int]] = [[]]
    label_block: Dict[str, int] = {}
    for i, (kind, text) in enumerate(stmts):
        if kind == "label":
            if blocks[-1]:
                blocks.append([])
            label_block[text] = len(blocks) - 1
        blocks[-1].append(i)
        if kind in ("branch", "exit"):
            blocks.append([])
    succ: List[List[int]] = []
    for b, idx in enumerate(blocks):
        last = stmts[idx[-1]] if idx else None
        nxt = [b + 1] if b + 1 < len(blocks) else []
        if last is None or last[0] in ("label", "op"):
            succ.append(nxt)
        elif last[0] == "branch":
            target, cond = last[1].rsplit(" ", 1)
            succ.append([label_block[target]] + (nxt if cond == "maybe" else []))
        else:  # exit
            succ.append(nxt if last[1] == "maybe" else [])
    events = [classify(text) if kind == "op" else [] for kind, text in stmts]
    # forward may-analysis: the set of fact-sets reachable at each block's entry
    entry_facts: List[Set[FrozenSet[str]]] = [set() for _ in blocks]
    entry_facts[0].add(frozenset())
    work = [0]
    while work:
        b = work.pop()
        for facts in list(entry_facts[b]):
            f = facts
            for i in blocks[b]:
                f = _transfer(f, events[i])
            for s in succ[b]:
                if f not in entry_facts[s]:
                    entry_facts[s].add(f)
                    work.append(s)
    found: Dict[str, Set[int]] = {key: set() for key, _, _ in _CHECKS}
    for b, idx in enumerate(blocks):
        for f in entry_facts[b]:
            for i in idx:
                for key, event, owed in _CHECKS:
                    if event in events[i] and not owed.isdisjoint(f):
                        found[key].add(i)
                f = _transfer(f, events[i])
    counts = {e: sum(e in ev for ev in events) for e in EVENTS}
    weak = [i for i, ev in enumerate(events) if "weak_scope" in ev]
    sites = {key: [f"#{i} {stmts[i][1]}" for i in sorted(at)] for key, at in found.items()}
    return dict(kernel=name, counts=counts, **sites,
                weak_scope=[f"#{i} {stmts[i][1]}" for i in weak])


#: The kernels whose programs synchronize through global memory, and what each build must
#: show: ``acquire`` / ``release`` (at least one of each in the PTX), ``tma_reads_published``
#: (its TMA loads read A, which other programs, or its own threads, wrote: every one needs the
#: proxy fence), ``loads_read_published`` (its generic loads read what other programs
#: published, the stream-K partial tiles: each after a barrier, none non-coherent) and
#: ``when`` (the constexpr a build needs for the protocol to be compiled in: the two-pass GEMM
#: synchronizes only in its stream-K builds).
PROTOCOLS: Dict[str, Dict] = {
    "_features_helper_kernel": dict(acquire=False, release=True, tma_reads_published=False,
                                    loads_read_published=False, when=None),
    "_gemm_ready_kernel": dict(acquire=True, release=True, tma_reads_published=True,
                               loads_read_published=True, when=None),
    "_gemm_tma_kernel": dict(acquire=True, release=True, tma_reads_published=False,
                             loads_read_published=True, when="SEGMENTS"),
}


def protocol_problems(kernel: str, constexprs: Dict, facts: Dict) -> List[str]:
    """What one build's :func:`audit` facts break of the ordering its kernel needs.

    Every kernel: no CTA-scope strong operation, no ``release`` after an unbarriered store.
    The kernels of :data:`PROTOCOLS` (where their ``when`` constexpr is set): their acquires
    and releases present; where TMA reads published data, every TMA load fenced; where
    generic loads do, each after a barrier and none non-coherent.
    """
    out = [f"{kernel}: strong operation at CTA/cluster scope: {w}" for w in facts["weak_scope"]]
    out += [f"{kernel}: release after a store with no CTA barrier between: {w}"
            for w in facts["unbarriered_releases"]]
    need = PROTOCOLS.get(kernel)
    if need is None or (need["when"] and not constexprs.get(need["when"])):
        return out
    for sem in ("acquire", "release"):
        if need[sem] and not facts["counts"][sem]:
            out.append(f"{kernel}: no {sem} operation left in the PTX")
    if need["tma_reads_published"]:
        out += [f"{kernel}: TMA load reachable from an acquire or store without a proxy "
                f"fence and a CTA barrier: {w}" for w in facts["unfenced_tma_loads"]]
    if need["loads_read_published"]:
        out += [f"{kernel}: load reachable from an acquire without a CTA barrier: {w}"
                for w in facts["unbarriered_loads"]]
        out += [f"{kernel}: non-coherent load reachable from an acquire: {w}"
                for w in facts["nc_loads_after_acquire"]]
    return out
