"""The memory-ordering audit of PTX (``dc_kernels.ops.ordering``) on hand-written kernels.

The real builds are audited in ``tests/test_aot_compile.py`` (every kernel as the JIT binds it,
and the pipelined GEMM with its proxy fences compiled out, which must be refused). Here each
rule is held to small bodies in the forms triton 3.6 and 3.9 emit (``atom.release`` /
``red.release``, ``shared::cluster`` / ``shared::cta`` TMA destinations), each correct body
beside the one mutation that must fail, including the mutations only a control-flow graph sees
(a barrier on one branch of two, a fence before the loop's acquire, a back edge).
"""

import pytest

from dc_kernels.ops import ordering

TMA_39 = ("cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes "
          "[%r1], [%rd1, {%r2, %r3}], [%r4]")
TMA_36 = ("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
          "[%r1], [%rd1, {%r2, %r3}], [%r4]")
RELEASE_39 = "@%p1 red.global.gpu.release.add.u32 [ %rd2 + 0 ], %r5"
RELEASE_36 = "@%p1 atom.global.gpu.release.add.u32 %r6, [ %rd2 + 0 ], %r5"
ACQUIRE = "@%p1 ld.global.gpu.acquire.b32 %r7, [ %rd3 + 0 ]"
STORE = "st.global.cg.v4.b32 [ %rd4 + 0 ], { %r8, %r9, %r10, %r11 }"
BAR = "bar.sync \t0"
FENCE = "fence.proxy.async.global; mov.u32 %r12, %r13"


def kernel(*lines, name="k"):
    body = "\n".join(f"\t{x};" if not x.endswith(":") and x not in ("{", "}") else x
                     for x in lines)
    return (f"//\n.version 8.7\n.target sm_90a\n.visible .entry {name}(\n"
            f"\t.param .u64 {name}_param_0\n)\n.maxntid 256\n{{\n\t.reg .b32 %r<20>;\n"
            f"\t.loc\t1 10 5 // x.py:10:5\n{body}\n\tret;\n}}\n\t.file\t1 \"x.py\"\n")


def problems(ptx, name="_gemm_ready_kernel", **constexprs):
    # the body's own name does not matter to the rules: ``name`` says which kernel's are held
    return ordering.protocol_problems(name, constexprs, ordering.audit(ptx))


@pytest.mark.parametrize("op, events", [
    (RELEASE_39.split(" ", 1)[1], ["release"]),
    (RELEASE_36.split(" ", 1)[1], ["release"]),
    (ACQUIRE.split(" ", 1)[1], ["acquire"]),
    ("atom.global.gpu.acq_rel.add.u32 %r1, [%rd1+0], %r2", ["acquire", "release"]),
    ("atom.global.gpu.relaxed.add.u32 %r1, [%rd1+0], %r2", []),
    ("atom.global.cta.acquire.add.u32 %r1, [%rd1+0], %r2", ["weak_scope", "acquire"]),
    ("ld.global.relaxed.cluster.b32 %r1, [%rd1]", ["weak_scope"]),
    ("ld.global.sys.acquire.b32 %r1, [%rd1]", ["acquire"]),
    ("fence.proxy.async.global", ["proxy_fence"]),
    ("fence.proxy.async", ["proxy_fence"]),
    ("fence.proxy.async.shared::cta", []),
    ("fence.proxy.tensormap::generic.acquire.gpu", []),
    ("bar.sync 0", ["barrier"]),
    ("barrier.sync.aligned 0", ["barrier"]),
    ("barrier.cta.sync 1, 256", ["barrier"]),
    ("bar.warp.sync -1", []),
    ("bar.arrive 1, 256", []),
    (TMA_39, ["tma_load"]),
    (TMA_36, ["tma_load"]),
    ("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd1, {%r1, %r2}], [%r3]",
     ["tma_store"]),
    ("cp.async.bulk.prefetch.tensor.2d.L2.global [%rd1, {%r1, %r2}]", []),
    (STORE, ["store"]),
    ("st.global.v2.b32 [%rd1], {%r1, %r2}", ["store"]),
    ("st.shared.b32 [%r1], %r2", []),
    ("ld.global.cg.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1]", ["load"]),
    ("ld.global.nc.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1]", ["load", "nc_load"]),
    ("cp.async.cg.shared.global [%r1], [%rd1], 16, p", ["load"]),
    ("ld.shared.b32 %r1, [%r2]", []),
    ("mbarrier.try_wait.parity.shared::cta.b64 complete, [%r1], %r2", []),
])
def test_classify(op, events):
    assert ordering.classify(op) == events


def test_statements_scope_inline_asm_labels():
    # two mbarrier waits, each with its own waitLoop (the label repeats per inline-asm scope),
    # a predicated branch, an unconditional one and two statements on one line
    ptx = kernel("$L__BB0_1:", "{", ".reg .pred complete", "waitLoop:",
                 "mbarrier.try_wait.parity.shared::cta.b64 complete, [%r1], %r2",
                 "@!complete bra.uni waitLoop", "}", "{", ".reg .pred complete",
                 "waitLoop:", "mbarrier.try_wait.parity.shared::cta.b64 complete, [%r1], %r3",
                 "@!complete bra.uni waitLoop", "}", FENCE, "@%p2 bra $L__BB0_1",
                 "bra.uni $L__BB0_1")
    name, st = ordering.statements(ptx)
    assert name == "k"
    labels = [t for k, t in st if k == "label"]
    assert len(labels) == 3 and len(set(labels)) == 3
    branches = [t for k, t in st if k == "branch"]
    assert branches[0].split()[0] == labels[1] and branches[1].split()[0] == labels[2]
    assert [b.split()[1] for b in branches] == ["maybe", "maybe", "maybe", "always"]
    ops = [t for k, t in st if k == "op"]
    assert "fence.proxy.async.global" in ops and "mov.u32 %r12, %r13" in ops
    assert st[-1] == ("exit", "always")


def test_statements_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="no .entry"):
        ordering.statements(".version 8.7\n")
    with pytest.raises(ValueError, match="no .entry other"):
        ordering.statements(kernel("bar.sync 0"), "other")
    with pytest.raises(ValueError, match="undefined label"):
        ordering.audit(kernel("bra.uni $L__nowhere"))
    with pytest.raises(ValueError, match="indirect branch"):
        ordering.audit(kernel("brx.idx %r1, $L__targets"))
    with pytest.raises(ValueError, match="unterminated"):
        ordering.statements(kernel("bar.sync 0").rsplit("}", 1)[0])


@pytest.mark.parametrize("release", [RELEASE_39, RELEASE_36])
def test_publish_needs_a_barrier_between_the_stores_and_the_release(release):
    name = "_features_helper_kernel"
    assert problems(kernel(STORE, BAR, release), name) == []
    bad = problems(kernel(STORE, release), name)
    assert len(bad) == 1 and "no CTA barrier" in bad[0]
    # a barrier on one branch only: the path around it still reaches the release
    one_branch = kernel(STORE, "@%p3 bra $L__BB0_2", BAR, "$L__BB0_2:", release)
    assert len(problems(one_branch, name)) == 1
    # a barrier before the stores does not count, one after them does whatever the branches
    assert len(problems(kernel(BAR, STORE, release), name)) == 1
    both = kernel(STORE, "@%p3 bra $L__BB0_2", BAR, "bra.uni $L__BB0_3", "$L__BB0_2:", BAR,
                  "$L__BB0_3:", release)
    assert problems(both, name) == []
    # every kernel is held to it, with or without a declared protocol
    assert len(problems(kernel(STORE, release), "_some_other_kernel")) == 1


@pytest.mark.parametrize("tma", [TMA_39, TMA_36])
def test_tma_after_an_acquire_needs_a_proxy_fence_and_a_barrier(tma):
    release = RELEASE_39
    ok = kernel(ACQUIRE, BAR, FENCE, tma, STORE, BAR, release)
    assert problems(ok) == []
    # the fence and the barrier in either order (the acquiring thread fences before the
    # barrier, or the issuing thread after it)
    assert problems(kernel(ACQUIRE, FENCE, BAR, tma, STORE, BAR, release)) == []
    for body in ((ACQUIRE, BAR, tma), (ACQUIRE, FENCE, tma), (ACQUIRE, tma),
                 # a fence before the acquire does not order it
                 (FENCE, BAR, ACQUIRE, tma),
                 # the CTA's own generic stores, read back by TMA
                 (ACQUIRE, BAR, FENCE, STORE, BAR, release, tma)):
        bad = problems(kernel(*body, STORE, BAR, release))
        assert len(bad) == 1 and "TMA load" in bad[0], body
    # a loop whose acquire comes at its bottom: the back edge reaches the next iteration's
    # TMA load unfenced, though the text puts the fence before it
    loop = kernel(ACQUIRE, BAR, FENCE, "$L__BB0_1:", tma, ACQUIRE, BAR, "@%p2 bra $L__BB0_1",
                  STORE, BAR, release)
    assert len(problems(loop)) == 1
    # the fence on only one of two paths to the load
    split = kernel(ACQUIRE, BAR, "@%p2 bra $L__BB0_2", FENCE, "$L__BB0_2:", tma, STORE, BAR,
                   release)
    assert len(problems(split)) == 1


LOAD = "ld.global.cg.v4.b32 {%r1, %r2, %r3, %r4}, [%rd5]"
NC_LOAD = "ld.global.nc.v4.b32 {%r1, %r2, %r3, %r4}, [%rd5]"


def test_loads_of_published_partials_need_a_barrier_after_the_acquire():
    # the stream-K reducer: one lane's acquire, the barrier that hands it to the CTA, then
    # every thread's loads of the partials
    name = "_gemm_tma_kernel"
    assert problems(kernel(ACQUIRE, BAR, LOAD, STORE, BAR, RELEASE_39), name, SEGMENTS=2) == []
    bad = problems(kernel(ACQUIRE, LOAD, BAR, STORE, BAR, RELEASE_39), name, SEGMENTS=2)
    assert len(bad) == 1 and "load reachable from an acquire without a CTA barrier" in bad[0]
    # on the path that skips the barrier only
    skip = kernel(ACQUIRE, "@%p2 bra $L__BB0_2", BAR, "$L__BB0_2:", LOAD, STORE, BAR,
                  RELEASE_39)
    assert len(problems(skip, name, SEGMENTS=2)) == 1
    # a non-coherent load may return what was there before the acquire, barrier or not; one
    # before any acquire is the kernel's business
    nc = problems(kernel(ACQUIRE, BAR, NC_LOAD, STORE, BAR, RELEASE_39), name, SEGMENTS=2)
    assert len(nc) == 1 and "non-coherent" in nc[0]
    assert problems(kernel(NC_LOAD, ACQUIRE, BAR, LOAD, STORE, BAR, RELEASE_39), name,
                    SEGMENTS=2) == []
    # the pipelined GEMM reads partials too; the helper reads only the layers
    assert len(problems(kernel(ACQUIRE, BAR, FENCE, TMA_39, LOAD, NC_LOAD, STORE, BAR,
                               RELEASE_39))) == 1
    assert problems(kernel(ACQUIRE, LOAD, NC_LOAD, STORE, BAR, RELEASE_39),
                    "_features_helper_kernel") == []


def test_what_each_protocol_kernel_must_contain():
    # the pipelined GEMM: acquire, release and fenced TMA loads; the two-pass GEMM only in its
    # stream-K builds (SEGMENTS), where its TMA reads nothing other programs wrote
    gemm = kernel(ACQUIRE, BAR, FENCE, TMA_39, STORE, BAR, RELEASE_39)
    assert problems(gemm) == []
    no_acquire = problems(kernel(FENCE, TMA_39, STORE, BAR, RELEASE_39))
    assert no_acquire == ["_gemm_ready_kernel: no acquire operation left in the PTX"]
    no_release = problems(kernel(ACQUIRE, BAR, FENCE, TMA_39))
    assert no_release == ["_gemm_ready_kernel: no release operation left in the PTX"]
    unfenced = kernel(ACQUIRE, BAR, TMA_39, STORE, BAR, RELEASE_39)
    assert problems(unfenced, "_gemm_tma_kernel", SEGMENTS=2) == []
    assert problems(kernel(TMA_39), "_gemm_tma_kernel", SEGMENTS=0) == []
    assert len(problems(kernel(TMA_39), "_gemm_tma_kernel", SEGMENTS=2)) == 2
    weak = kernel("@%p1 ld.global.cta.acquire.b32 %r7, [ %rd3 + 0 ]", BAR, FENCE, TMA_39, STORE,
                  BAR, RELEASE_39)
    bad = problems(weak)
    assert len(bad) == 1 and "CTA/cluster scope" in bad[0]


def test_audit_counts_and_names_the_instructions():
    facts = ordering.audit(kernel(ACQUIRE, BAR, TMA_39, TMA_36, STORE, RELEASE_39), "k")
    assert facts["kernel"] == "k"
    assert facts["counts"] == dict(acquire=1, release=1, proxy_fence=0, barrier=1, tma_load=2,
                                   tma_store=0, store=1, load=0, nc_load=0, weak_scope=0)
    assert len(facts["unfenced_tma_loads"]) == 2
    assert all(w.startswith("#") and "cp.async.bulk.tensor" in w
               for w in facts["unfenced_tma_loads"])
    assert facts["unbarriered_releases"] == [
        w for w in facts["unbarriered_releases"] if "red.global.gpu.release" in w]
    assert len(facts["unbarriered_releases"]) == 1
