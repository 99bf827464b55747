"""Ahead-of-time builds of the kernels that run, for sm_80 and sm_90, on a CPU-only machine.

``dc_kernels.ops.triton_aot`` records the launches the public functions make for the benchmark
shapes (CLIP-L/336 and SigLIP-384 presets; DCI, SCI, STI; 1, 16 and 64 images; N = 4096; every
dtype, path and autotune config that survives pruning) and for awkward layouts (channel stride
!= 1, misaligned views, token-major storage, sizes not divisible by 16, a transposed weight,
TF32), binds them with Triton's own binder (the specialization the JIT would compile) and
builds them. Every build must succeed, spill nothing, fit its architecture's shared memory and
(16-bit and TF32 GEMMs on sm_90) use wgmma.

The builds run once, in a subprocess without ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` hands back interpreted functions the compiler cannot take).
"""

import json
import os
import subprocess
import sys

import pytest

from dc_kernels.ops import linear as linear_ops
from dc_kernels.ops import triton_aot

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "reports.json"
    res = subprocess.run([sys.executable, "-m", "dc_kernels.ops.triton_aot", "--json",
                          str(path)], env=ENV, capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, f"AOT builder failed:\n{res.stderr[-4000:]}"
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def portable_reports(tmp_path_factory):
    # every case for the other cards that run the kernels (triton_aot.PORTABLE_ARCHS: sm_86,
    # sm_100, sm_120), which run the portable kernels with their configs pruned to fit
    path = tmp_path_factory.mktemp("aot") / "portable.json"
    archs = ",".join(map(str, triton_aot.PORTABLE_ARCHS))
    res = subprocess.run([sys.executable, "-m", "dc_kernels.ops.triton_aot", "--arch", archs,
                          "--json", str(path)],
                         env=ENV, capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, f"AOT builder failed:\n{res.stderr[-4000:]}"
    return json.loads(path.read_text())


def _label(r):
    return f"{r['kernel']} sm_{r['arch']} cfg {r['config']} ({r['uses'][0]['case']})"


def test_every_build_succeeds(reports):
    errors = [f"{_label(r)}: {r['error']}" for r in reports if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_spills(reports):
    bad = [f"{_label(r)}: {r['spill_stores']} STL / {r['spill_loads']} LDL, "
           f"{r['registers']} registers" for r in reports
           if "error" not in r and (r["spill_stores"] or r["spill_loads"])]
    assert not bad, "\n".join(bad)


def test_shared_memory_within_each_architecture(reports):
    bad = [f"{_label(r)}: {r['shared']} B > {r['shared_limit']} B" for r in reports
           if "error" not in r and r["shared"] > r["shared_limit"]]
    assert not bad, "\n".join(bad)
    assert all(0 < r["registers"] <= 255 for r in reports if "error" not in r)


def test_tensor_core_gemms_use_wgmma_on_hopper(reports):
    for r in reports:
        if "error" in r or r["arch"] < 90 or r["kernel"] not in (
                "_linear_kernel", "_gemm_tma_kernel", "_gemm_ready_kernel"):
            continue
        dtypes = {u["facts"].get("dtype") for u in r["uses"]}
        tf32 = r["constexprs"].get("INPUT_PRECISION") == "tf32"
        if dtypes <= {"bf16", "fp16"} or tf32:
            assert r["has_wgmma"], f"{_label(r)}: no wgmma"


def test_cross_program_ordering_survives_compilation(reports):
    # the pipelined path's GEMM and helper, and the stream-K GEMM's partial tiles, synchronize
    # programs through global memory: in the PTX as the JIT builds it (every path of its
    # control-flow graph, dc_kernels.ops.ordering) each release follows a CTA barrier after
    # the stores it publishes, every strong operation is at GPU scope, and every TMA load of
    # the pipelined GEMM, which reads A that other programs wrote, follows a proxy fence and
    # a barrier after each acquire (.ci/aot36 checks triton 3.6's builds the same way)
    from dc_kernels.ops import ordering
    bad = [f"{_label(r)}: {p}" for r in reports if "error" not in r
           for p in r["ordering_problems"]]
    assert not bad, "\n".join(bad)
    for kernel, need in ordering.PROTOCOLS.items():
        built = [r for r in reports if r.get("kernel") == kernel and "error" not in r
                 and (not need["when"] or r["constexprs"].get(need["when"]))]
        assert built, f"no build of {kernel} with its protocol"
        for r in built:
            counts = r["ordering"]["counts"]
            assert r["arch"] == 90, _label(r)
            assert bool(counts["acquire"]) >= need["acquire"], _label(r)
            assert counts["release"] > 0 and counts["barrier"] > 0, _label(r)
            if need["tma_reads_published"]:
                assert counts["proxy_fence"] > 0 and counts["tma_load"] > 0, _label(r)
    # the two-pass GEMM's whole-tile builds run no protocol: none of its atomics left
    whole = [r for r in reports if r.get("kernel") == "_gemm_tma_kernel" and "error" not in r
             and not r["constexprs"].get("SEGMENTS")]
    assert whole and all(not r["ordering"]["counts"]["acquire"] for r in whole)


def test_a_dropped_proxy_fence_is_caught():
    # the check is not vacuous: the pipelined GEMM built as the JIT binds it for one and for
    # 16 CLIP images (stream K over the slabs, and whole tiles), once as it runs and once
    # with its proxy fences compiled out (FENCE=False, the interpreter's build): only the
    # second is refused, at the TMA loads of A
    out = _run("""
from dc_kernels.ops import ordering, triton_aot as t
cases = {c.name: c for c in t.aot_cases(("bf16",))}
for images in (1, 16):
    case = cases[f"linear-pipelined/clip336-dci-{images}img-bf16"]
    (b,) = [b for b in t.unique_builds([case], (90,)) if b.record.name == "_gemm_ready_kernel"]
    assert b.kwargs["FENCE"] is True
    for fence in (True, False):
        kw = dict(b.kwargs, FENCE=fence)
        r = t.build(b.record.fn, b.args, kw, 90)
        facts = ordering.audit(r.ptx)
        problems = ordering.protocol_problems(r.kernel, kw, facts)
        print(images, fence, facts["counts"]["proxy_fence"], facts["counts"]["tma_load"],
              len(problems), all("TMA load" in p for p in problems))
""")
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 4, out
    for images, fence, fences, loads, problems, all_tma in rows:
        assert int(loads) > 0, out
        if fence == "True":
            assert int(fences) > 0 and problems == "0", out
        else:
            # every TMA load of the GEMM is flagged (W's too: the check cannot tell them apart)
            assert fences == "0" and problems == loads and all_tma == "True", out


def test_every_kernel_and_case_is_built(reports):
    kernels = {(r["kernel"], r["arch"]) for r in reports}
    for arch in triton_aot.ARCHS:
        for k in ("_features_kernel", "_sti_features_kernel", "_linear_kernel",
                  "_scatter_grad_kernel"):
            assert (k, arch) in kernels
    assert ("_gemm_tma_kernel", 90) in kernels and ("_gemm_tma_kernel", 80) not in kernels
    assert ("_features_tma_kernel", 90) in kernels
    cases = {u["case"] for r in reports for u in r["uses"]}
    assert cases == {c.name for c in triton_aot.aot_cases()}


def test_one_image_gemm_runs_stream_k_on_hopper(reports):
    # 576 rows -> 4096 give 80 tiles for 132 SMs: the two-pass GEMM runs stream K (the build
    # is checked like every other: built, no spills, shared memory, wgmma); 16 images do not
    shapes = {}
    for r in reports:
        if r.get("kernel") != "_gemm_tma_kernel" or r["arch"] != 90 or "error" in r:
            continue
        for u in r["uses"]:
            if u["case"].startswith("linear-two-pass/clip336-dci-") and u["case"].endswith(
                    "-bf16"):
                shapes.setdefault(u["case"], set()).add(
                    (r["constexprs"].get("SEGMENTS", 0), r["constexprs"].get("PARTS", 1),
                     u["grid"][0]))
    assert shapes["linear-two-pass/clip336-dci-1img-bf16"] == {(2, 3, 128)}
    assert {s[0] for s in shapes["linear-two-pass/clip336-dci-16img-bf16"]} == {0}


def test_measured_constants_move_the_estimates_that_use_them(reports):
    # benchmarks.static with a card's measured constants (gpu_from_constants): a costlier
    # stream-K partial tile slows exactly the rows whose GEMM splits tiles (one image), a
    # costlier launch every row by its launches
    from dataclasses import replace
    from benchmarks import static
    base = static.GPUS[90]

    def rows(gpu):
        return {r["case"]: r for r in static.estimate_rows(reports, 90, gpu)}
    r0 = rows(base)
    r1 = rows(replace(base, partial_steps=2 * base.partial_steps))
    for case in ("linear-two-pass/clip336-dci-1img-bf16",
                 "linear-pipelined/clip336-dci-1img-bf16",
                 "linear-pipelined/siglip384-dci-1img-bf16"):
        assert r1[case]["est_s"] > r0[case]["est_s"] * 1.02, case
    for case in ("linear-two-pass/clip336-dci-16img-bf16",
                 "linear-pipelined/clip336-dci-16img-bf16", "features/clip336-dci-1img-bf16"):
        assert r1[case]["est_s"] == r0[case]["est_s"], case
    r2 = rows(replace(base, launch_fixed_s=base.launch_fixed_s + 1e-6))
    for case in ("features/clip336-dci-16img-bf16", "linear-two-pass/clip336-dci-16img-bf16"):
        launches = len(r0[case]["launches"])
        assert r2[case]["est_s"] - r0[case]["est_s"] >= 0.99e-6 * launches, case


def test_pipelined_helper_fits_beside_its_gemm_on_hopper(reports):
    # the pipelined path's two launches share every SM: 8 GEMM warps and 2 helper warps within
    # the register file (allocated per warp in 256-register units) and shared memory (1 KiB
    # reserved per CTA), for every benchmark case that runs them (.ci/aot36 runs the same
    # check on triton 3.6's builds); sm_80 never builds them
    from benchmarks.static import pipelined_residency_problems
    pipelined = [r for r in reports if r.get("kernel") in ("_gemm_ready_kernel",
                                                             "_features_helper_kernel")]
    assert pipelined and all(r["arch"] == 90 for r in pipelined)
    assert any(u["case"].startswith("linear-pipelined/clip336-dci-16img")
               for r in pipelined for u in r["uses"])
    assert pipelined_residency_problems(reports) == []


def test_overlap_features_fit_beside_their_gemm_on_hopper(reports):
    # the overlapped path's chunks after the first run their features beside the GEMM's CTAs:
    # every beside-config features build (TMA: 2 warps, STI: 4; capped at
    # features.BESIDE_GEMM_REGISTERS) fits beside every GEMM build that leaves room (capped at
    # gemm_tma.OVERLAP_GEMM_MAXNREG) of each overlap case (.ci/aot36: the same on triton 3.6,
    # whose uncapped 128 x 256 GEMM took 237 registers and fit neither); the check finds them
    from benchmarks.static import overlap_residency_problems
    cases = {u["case"] for r in reports if r.get("kernel") in ("_features_tma_kernel",
                                                               "_sti_features_kernel")
             and r["num_warps"] in (2, 4) for u in r["uses"] if "overlap/" in u["case"]}
    assert any(c.startswith("linear-overlap/clip336-dci-16img") for c in cases)
    assert any(c.startswith("linear-overlap/clip336-sti-16img") for c in cases)
    assert overlap_residency_problems(reports) == []
    # (and reports one that does not fit: a leave-room GEMM build beside a 4-warp STI build
    # of 255 registers, 32 K of them)
    g = next(r for r in reports if r.get("kernel") == "_gemm_tma_kernel"
             and any(u["case"].startswith("linear-overlap/clip336-sti-16img") for u in r["uses"])
             and r["maxnreg"] is not None)
    f = dict(kernel="_sti_features_kernel", arch=90, registers=255, shared=0, num_warps=4,
             constexprs={}, uses=[dict(case="linear-overlap/too-big")])
    assert overlap_residency_problems(
        [dict(g, uses=[dict(case="linear-overlap/too-big")]), f])[0].startswith(
            "linear-overlap/too-big: _sti_features_kernel (255 registers")


def test_tma_features_ring_is_built_as_deep_as_the_launcher_asks(reports):
    # the launcher deepens the TMA features kernel's ring by its STAGES (features._tma_stages)
    # and the cost model counts STAGES - 1 tiles of every layer in flight: the compiled
    # kernel's shared memory is that ring (Triton's pipeliner keeps STAGES - 1 buffers of each
    # TMA load), so the depth asked for is the depth built. 16-bit SCI at 16 images asks for 5
    sizes = {"bf16": 2, "fp16": 2, "fp32": 4}
    depths = set()
    for r in reports:
        if r.get("kernel") != "_features_tma_kernel" or "error" in r:
            continue
        c = r["constexprs"]
        e = {sizes[u["facts"]["dtype"]] for u in r["uses"] if "dtype" in u["facts"]}
        if len(e) != 1:
            continue
        tile = (1 + sum(c["SIZES"])) * c["ROWS"] * c["BLOCK_C"] * e.pop()
        ring = max(1, c["STAGES"] - 1) * tile
        assert ring <= r["shared"] < ring + tile, (_label(r), c["STAGES"], r["shared"], ring)
        if any(u["case"] == "features/clip336-sci-16img-bf16" for u in r["uses"]):
            depths.add(c["STAGES"])
    assert depths == {5}


def test_residency_check_names_the_cases_that_do_not_fit():
    # the check itself (no build): a helper whose shared memory does not fit beside a 144 KiB
    # GEMM, and a GEMM too large for an SM, are reported by case; a pair that fits is not
    from benchmarks.static import pipelined_residency_problems

    def rep(kernel, regs, shared, warps, case):
        return dict(kernel=kernel, arch=90, registers=regs, shared=shared, num_warps=warps,
                    uses=[dict(case=case)])
    reports = [rep("_gemm_ready_kernel", 216, 147480, 8, "fits"),
               rep("_features_helper_kernel", 72, 55296, 2, "fits"),
               rep("_gemm_ready_kernel", 216, 147480, 8, "helper-too-big"),
               rep("_features_helper_kernel", 72, 90000, 2, "helper-too-big"),
               rep("_gemm_ready_kernel", 216, 240000, 8, "gemm-too-big")]
    bad = pipelined_residency_problems(reports)
    assert len(bad) == 2
    assert bad[0].startswith("gemm-too-big: the GEMM") and bad[1].startswith("helper-too-big:")


def test_shared_memory_bound_of_the_pruner_holds(reports):
    # the launcher prunes _linear_kernel configs by shared_bytes_bound: it must bound every
    # real build from above, or a config that does not fit could slip through
    for r in reports:
        if r.get("kernel") != "_linear_kernel" or "error" in r:
            continue
        c = r["constexprs"]
        cfg = linear_ops._cfg(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], r["num_warps"],
                              r["num_stages"])
        sizes = c.get("SIZES") or ()
        e = 4 if r["uses"][0]["facts"].get("dtype") == "fp32" else 2
        bound = linear_ops.shared_bytes_bound(cfg, max(sizes, default=1), e)
        assert r["shared"] <= bound, f"{_label(r)}: {r['shared']} B > bound {bound} B"


# --------------------------------------------------------------------------- the binder
def test_binder_specializes_as_the_runtime():
    # unit channel stride -> constexpr; 16-divisible ints and 16-byte aligned pointers -> hints;
    # a misaligned view and an odd size lose them. Checked on the features kernel's launch.
    out = _run("""
import torch, json
from dc_kernels.ops import triton_aot as A
from dc_kernels import ConnectorSpec, dense_connector_features
from dc_kernels.ops import features
features.USE_TMA = False
spec = ConnectorSpec.preset('clip', 'dci')
res = {}
for name, hs in (('aligned', A._hidden_states(spec, 1, 577, 1024, torch.bfloat16)),
                 ('misaligned', A._hidden_states(spec, 1, 577, 1024, torch.bfloat16, 'misaligned')),
                 ('strided', A._hidden_states(spec, 1, 577, 1024, torch.bfloat16, 'channel_stride'))):
    with A.record_launches(90) as recs:
        dense_connector_features(hs, spec, backend='triton')
    r = recs[0]
    options, sig, const, attrs = A.bind(r.fn, r.args, r.kwargs, 90)
    res[name] = dict(stride_c=sig['stride_c'][0], layer0_hint=attrs[(0, 0)],
                     t_keep_hint=attrs[(list(sig).index('T_KEEP'),)])
print(json.dumps(res))
""")
    res = json.loads(out.strip().splitlines()[-1])
    assert res["aligned"]["stride_c"] == "constexpr"
    assert res["aligned"]["layer0_hint"] == [["tt.divisibility", 16]]
    assert res["aligned"]["t_keep_hint"] == [["tt.divisibility", 16]]
    assert res["misaligned"]["layer0_hint"] == []
    assert res["strided"]["stride_c"] == "i32"


def test_the_features_kernel_that_runs_uses_vector_loads():
    # the regression the old hand-written signatures hid: as the JIT builds it, the CLIP DCI
    # features kernel loads 16 bytes per thread (LDG.E.128) from each of its 25 layer entries;
    # and the launcher's wide config (features.FEATURES_CONFIG) goes exactly to the layouts
    # the JIT builds 16-byte loads for: not to 200 channels (no divisibility hint: scalar
    # loads, which spilled the wide config on sm_120 until 2026-12-05), a channel stride of 2
    # or a view one element into its storage; token-major storage keeps them
    out = _run("""
import torch, json
from dc_kernels.ops import triton_aot as A, features
from dc_kernels import ConnectorSpec, dense_connector_features
features.USE_TMA = False
spec = ConnectorSpec.preset('clip', 'dci')
res = {}
for name, C, layout in (('contiguous', 1024, 'contiguous'), ('c200', 200, 'contiguous'),
                        ('channel_stride', 1024, 'channel_stride'),
                        ('misaligned', 1024, 'misaligned'), ('token_major', 1024, 'token_major')):
    with A.record_launches(80) as recs:
        dense_connector_features(A._hidden_states(spec, 1, 577, C, torch.bfloat16, layout),
                                 spec, backend='triton')
    r = A.build(recs[0].fn, recs[0].args, recs[0].kwargs, 80)
    res[name] = dict(v128=r.sass.count('LDG.E.128'), block_c=recs[0].kwargs['BLOCK_C'],
                     spills=r.spill_stores + r.spill_loads)
print(json.dumps(res))
""")
    res = json.loads(out.strip().splitlines()[-1])
    from dc_kernels.ops import features
    wide, narrow = features.FEATURES_CONFIG["BLOCK_C"], features.FEATURES_CONFIG_SCALAR["BLOCK_C"]
    assert res["contiguous"]["v128"] == 25, res
    for name in ("contiguous", "token_major"):
        assert res[name]["block_c"] == wide and res[name]["v128"] > 0, (name, res)
    for name in ("c200", "channel_stride", "misaligned"):
        assert res[name]["block_c"] == narrow and res[name]["v128"] == 0, (name, res)
    assert not any(x["spills"] for x in res.values()), res


def test_the_benchmark_names_the_path_that_runs():
    # the bundle's auto dc_kernels row says which path it ran (benchmarks.providers._dc_note):
    # recorded as on an H100 / an H200, its path is the one whose kernels the launch makes
    # (until 2026-12-04 the note asked the rule without the pipelined path and said
    # "two-pass" where the pipelined kernels ran; and the recording itself never took the
    # auto path's CUDA-only choices, pipelined and overlap)
    out = _run("""
import json, torch
from benchmarks.cases import SHAPES, Case, make_inputs
from benchmarks.providers import _dc_note
from dc_kernels import dense_connector_linear
from dc_kernels.ops import triton_aot as A
res = []
for name, images, card in (('clip336-4096', 1, None), ('clip336-4096-sci', 1, None),
                           ('clip336-4096-sci', 2, None),
                           ('clip336-7168', 3, None), ('clip336-7168', 3, 'h200'),
                           ('clip336-4096-sti', 1, None), ('siglip384-4096-sti', 16, None)):
    inputs = make_inputs(Case(SHAPES[name], images), torch.bfloat16, torch.device('cpu'))
    with A.record_launches(90, card=card) as recs, torch.no_grad():  # as the bundle runs it
        note = _dc_note('linear', inputs, torch.device('cuda'))[1]
        dense_connector_linear(inputs.hidden_states, inputs.spec, inputs.w1, inputs.b1,
                               'gelu', backend='triton')
    res.append([name, images, card, note.split('auto path=')[-1], [r.name for r in recs]])
print(json.dumps(res))
""")
    res = json.loads(out.strip().splitlines()[-1])
    kernels = {"pipelined": ["_features_helper_kernel", "_gemm_ready_kernel"],
               "two-pass": ["_features_tma_kernel", "_gemm_tma_kernel"],
               "two-pass (A read in place)": ["_gemm_tma_kernel"],
               "overlap": ["_features_tma_kernel", "_gemm_tma_kernel"] * 2}
    seen = set()
    for name, images, card, path, launched in res:
        if name.endswith("-sti"):
            # STI: its features (copy and pooled) one launch; one CLIP image two-pass, 16 SigLIP
            # images overlapped in image chunks (features and GEMM per chunk, at least two)
            sti = ["_sti_features_kernel", "_gemm_tma_kernel"]
            assert (path, images) in (("two-pass", 1), ("overlap", 16)), res
            assert launched == sti if images == 1 else \
                (launched[:4] == sti * 2 and len(launched) % 2 == 0), res
            continue
        if path == "overlap":  # row chunks: features and GEMM per chunk, at least two
            assert launched[:4] == kernels["overlap"] and len(launched) % 2 == 0, res
        else:
            assert launched == kernels[path], (name, images, card, path, launched)
        seen.add(path)
    # the cases above were picked to take the three paths (by the committed calibrations,
    # estimates): one CLIP image pipelined, SCI's one image two-pass with its GEMM reading
    # the layers in place (one image: its kept rows are one 2-D view), two images two-pass
    # writing A (the CLS rows between images), CLIP -> 7168 at three images pipelined on an
    # H100 and overlapped on an H200
    assert seen == {"pipelined", "two-pass", "two-pass (A read in place)", "overlap"}, res


# --------------------------------------------------------------------------- other cards
def test_the_other_cards_run_the_portable_kernels(portable_reports):
    # an A10 / RTX 30xx (sm_86), a B200 (sm_100) or an RTX 50xx (sm_120): no TMA kernel is
    # launched (on sm_100 the stream-K GEMM needs 254 registers, on sm_120 the TMA GEMM spills:
    # no wgmma), and every portable build the launchers pick for every case (benchmark, layout,
    # training; every dtype) builds without spills within the card's shared memory (the
    # autotuner's configs pruned by it, linear.prune_configs: the 12-layer fused configs of
    # 110-131 KiB that an A100 or H100 may run are pruned on the 99 KiB cards). Until
    # 2026-12-05 only the benchmark cases in bf16 were built here, for sm_86 and sm_120; the
    # wider set found the features kernel of the odd sizes (C = 200) spilling on sm_120 (40
    # STL / 48 LDL: the 16 x 64 vector config though the binder gives C = 200 no divisibility
    # hint) and _linear_kernel builds spilling 1-16 registers on sm_100 (ptxas' own
    # register target: linear.BLACKWELL_MAXNREG, linear.prune_configs)
    r = portable_reports
    assert {x["arch"] for x in r} == set(triton_aot.PORTABLE_ARCHS)
    kernels = {x["kernel"] for x in r}
    assert kernels == {"_features_kernel", "_sti_features_kernel", "_linear_kernel",
                       "_scatter_grad_kernel"}, kernels
    bad = [f"{_label(x)}: {triton_aot.build_problem(x)}" for x in r
           if triton_aot.build_problem(x)]
    assert not bad, "\n".join(bad)
    assert all(x["shared_limit"] == triton_aot.SHARED_LIMIT[x["arch"]] for x in r)
    for arch in triton_aot.PORTABLE_ARCHS:
        cases = {u["case"] for x in r if x["arch"] == arch for u in x["uses"]}
        assert cases == {c.name for c in triton_aot.aot_cases()}, arch
    # the fused path of one CLIP DCI image (12-layer groups): the 64 x 128 x 32 config (bound
    # 172,032 B) runs on a B200 as on an H100, and is pruned on the 99 KiB cards
    for arch in triton_aot.PORTABLE_ARCHS:
        fused = {u["config_desc"] for x in r if x["arch"] == arch for u in x["uses"]
                 if u["case"] == "linear-fused/clip336-dci-1img-bf16"}
        assert ("64x128x32 w4 s3" in fused) == (triton_aot.SHARED_LIMIT[arch] > 172032), \
            (arch, fused)


def test_blackwell_register_limit_goes_to_the_unmasked_k_loops_on_sm_100():
    # linear.BLACKWELL_MAXNREG: on sm_100 the _linear_kernel launches whose K loop is aligned
    # (linear.k_aligned: CLIP's benchmark shapes, and SigLIP's 729 rows, which only the M
    # masks see) carry the register limit and those with masked K (odd sizes: 200 channels)
    # do not; no other architecture's launches carry one
    out = _run("""
import json
from dc_kernels.ops import triton_aot as A
names = ("linear-fused/clip336-dci-1img-fp16", "linear-two-pass/clip336-dci-1img-fp32",
         "linear-two-pass/siglip384-dci-1img-fp32", "linear-fused/odd-sizes-fp32",
         "linear-two-pass/odd-sizes-bf16")
cases = [c for c in A.aot_cases() if c.name in names]
seen = {}
for arch in (80, 86, 90, 100, 120):
    for c in cases:
        seen[f"{arch} {c.name}"] = sorted({str(r.kwargs.get("maxnreg")) for r in
                                           A.record_case(c, arch)
                                           if r.fn.__name__ == "_linear_kernel"})
print(json.dumps(seen))
""")
    from dc_kernels.ops import linear
    seen = json.loads(out.strip().splitlines()[-1])
    assert len(seen) == 25, seen
    for key, values in seen.items():
        arch, name = key.split(" ")
        want = str(linear.BLACKWELL_MAXNREG) if arch == "100" and "odd-sizes" not in name \
            else "None"
        # (sm_90 runs some of these GEMMs with the TMA kernel: no _linear_kernel launch)
        assert values == [want] or (arch == "90" and not values), (key, values)


def test_the_launchers_prune_by_the_card_they_are_recorded_for():
    # the fused kernel's configs for 12-layer groups (CLIP DCI) as each card's autotuner sees
    # them: an H100 keeps the 64 x 128 x 32 config (bound 172,032 B, under its 232,448), an
    # A100 (166,912) and a 99 KiB card do not. Before 2026-12-04 the recordings pruned every
    # card at the A100's limit (the CPU stand-ins are not CUDA tensors), so the AOT checks
    # never built the configs an H100 runs
    out = _run("""
import json
from dc_kernels.ops import triton_aot as A
case = [c for c in A.aot_cases(("bf16",)) if c.name == "linear-fused/clip336-dci-1img-bf16"]
seen = {}
for arch in (80, 86, 90, 120):
    seen[arch] = sorted({u["config_desc"] for b in A.unique_builds(case, (arch,)) for u in b.uses})
print(json.dumps(seen))
""")
    seen = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    assert "64x128x32 w4 s3" in seen[90]
    for arch in (80, 86, 120):
        assert "64x128x32 w4 s3" not in seen[arch], (arch, seen[arch])
    assert "64x64x32 w4 s3" in seen[80] and "64x64x32 w4 s3" not in seen[86]
