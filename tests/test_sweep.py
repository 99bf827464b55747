"""The GPU sweep (benchmarks/sweep.py) and the provider switches it runs its variants with.

The sweep runs only on a lent GPU, so its plumbing is checked here on the CPU: the provider
names with switches, the switches set around each call and restored, the variant lists on an
H100's geometry (from the committed sm_90 calibration) and from the launchers under the
interpreter (each variant's switches giving that launch), the whole run with real providers
(the Triton variants listed as not run off CUDA), its budget and a failing variant."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import wrong_dc_kernels

from benchmarks import providers, sweep
from benchmarks.cases import SHAPES, Case, make_inputs
from benchmarks.cli import main as cli_main
from benchmarks.runner import Selection
from dc_kernels.ops import path, schedule

CPU = torch.device("cpu")
H100 = (132, (128, 256, 64))  # SMs, the pipelined and stream-K GEMMs' tile


def test_provider_names_with_switches():
    assert providers.split_provider("dc_kernels") == ("dc_kernels", {})
    assert providers.split_provider("dc_kernels-pipelined@programs=120,helpers=36") == \
        ("dc_kernels-pipelined", {"programs": 120, "helpers": 36})
    assert providers.split_provider("dc_kernels-two-pass@split_iters=-1") == \
        ("dc_kernels-two-pass", {"split_iters": -1})
    assert providers.variant_name("dc_kernels-pipelined", stream_k=0) == \
        "dc_kernels-pipelined@stream_k=0"
    for bad, match in (("dc_kernels-pipe", "unknown provider"),
                       ("dc_kernels-pipelined@progs=3", "unknown switch"),
                       ("dc_kernels-two-pass@programs=3", "read by dc_kernels-pipelined"),
                       ("dc_kernels@helpers=3", "read by dc_kernels-pipelined"),
                       ("dc_kernels-two-pass-nosplit@split_iters=4", "read by"),
                       ("dc_kernels-pipelined@programs=0", "integer >= 1"),
                       ("dc_kernels-pipelined@programs=3.5", "integer >= 1"),
                       ("dc_kernels-pipelined@programs", "integer >= 1"),
                       ("dc_kernels-pipelined@stream_k=2", "<= 1"),
                       ("dc_kernels-two-pass@split_iters=-2", "integer >= -1"),
                       ("dc_kernels-pipelined@helpers=2,helpers=3", "given twice")):
        with pytest.raises(ValueError, match=match):
            providers.split_provider(bad)
    with pytest.raises(TypeError):
        providers.split_provider(3)
    # a selection takes them; off CUDA they are Triton paths that do not run
    Selection(shapes=["clip336-4096"], images=[1], ops=["linear"],
              providers=["dc_kernels-pipelined@programs=120"]).validate()
    with pytest.raises(ValueError, match="unknown switch"):
        Selection(shapes=["clip336-4096"], images=[1], ops=["linear"],
                  providers=["dc_kernels-pipelined@x=1"]).validate()
    assert "CUDA" in providers.unavailable_reason("dc_kernels-pipelined@programs=120",
                                                  "linear", CPU)


def test_switches_are_set_around_each_call_and_restored():
    from dc_kernels.ops import gemm_tma, pipelined
    seen = []

    def unit():
        seen.append((pipelined.STREAM_K_PROGRAMS, pipelined.STREAM_K, gemm_tma.STREAM_K_ITERS))
        if len(seen) == 2:
            raise RuntimeError("boom")
        return ()
    before = (pipelined.STREAM_K_PROGRAMS, pipelined.STREAM_K, gemm_tma.STREAM_K_ITERS)
    run = providers._with_switches(unit, {"programs": 7, "stream_k": 0, "split_iters": -1})
    run()
    assert seen == [(7, False, -1)] and type(seen[0][1]) is bool
    assert (pipelined.STREAM_K_PROGRAMS, pipelined.STREAM_K, gemm_tma.STREAM_K_ITERS) == before
    with pytest.raises(RuntimeError, match="boom"):
        run()
    assert (pipelined.STREAM_K_PROGRAMS, pipelined.STREAM_K, gemm_tma.STREAM_K_ITERS) == before


def _names(vs):
    return [v.provider for v in vs]


def test_variants_on_an_h100():
    # the sweep's lists on an H100's geometry with the committed sm_90 calibration (what a
    # GPU run builds from the launchers' own choices), CLIP-L/336 and SigLIP-384 -> 4096
    m = path.model_for(90)
    sms, tile = H100
    for M, C, layers, row_tiles in ((576, 1024, 25, 72), (729, 1152, 27, 92)):
        rule = path.pipelined_stream_k_programs(M, C, 4096, layers, 3, 2, m, sms, tile)
        helpers = schedule.split_helpers(row_tiles, sms)
        assert rule and helpers < sms
        vs = sweep.pipelined_variants(M, C, 4096, layers, 3, 2, m, sms, tile, rule, helpers)
        names = _names(vs)
        assert names[0] == "dc_kernels-pipelined" and len(set(names)) == len(names)
        progs = [providers.split_provider(n)[1].get("programs") for n in names]
        positions = math.ceil(M / 128) * 16 * (C // 64)
        # every count the rule chose from (up to one per SM) but its own, and fewer
        _, chose_from = path.pipelined_stream_k_replays(M, C, 4096, layers, 3, 2, m, sms,
                                                        tile, helpers=helpers)
        assert set(chose_from) - {rule} <= set(progs)
        iters = -(-positions // rule)
        assert {-(-positions // (iters + 1)), -(-positions // (iters + 2))} <= set(progs)
        # the rule's pick is the fastest replay of those it chose from
        assert vs[0].model_s == min(chose_from.values())
        for v in vs:
            sw = providers.split_provider(v.provider)[1]
            if "programs" in sw:
                assert v.model_s is not None and v.model_s >= vs[0].model_s
        hs = {providers.split_provider(n)[1].get("helpers") for n in names} - {None}
        assert hs == {helpers // 4, helpers // 2, sms}
        assert names[-1] == "dc_kernels-pipelined@stream_k=0" and vs[-1].model_s > vs[0].model_s
        # two-pass: the rule's stream K, whole tiles, fewer programs each running more steps
        K = 3 * C
        tv = sweep.two_pass_variants(M, K, 4096, sms, tile)
        tiles, ks = math.ceil(M / 128) * 16, K // 64
        g = schedule.gemm_stream_k(tiles, ks, sms)
        assert _names(tv)[:2] == ["dc_kernels-two-pass", "dc_kernels-two-pass-nosplit"]
        assert tv[1].model_steps == ks and tv[0].model_steps < ks
        its = [providers.split_provider(n)[1]["split_iters"] for n in _names(tv)[2:]]
        assert its and all(i > -(-tiles * ks // g) for i in its) and len(set(its)) == len(its)
        assert all(v.model_steps > tv[0].model_steps for v in tv[2:])
    # 16 CLIP images: whole tiles by the rule; stream K on every SM and fewer helpers tried
    vs = sweep.pipelined_variants(9216, 1024, 4096, 25, 3, 2, m, sms, tile, 0, sms)
    assert _names(vs) == ["dc_kernels-pipelined", "dc_kernels-pipelined@programs=132",
                          "dc_kernels-pipelined@helpers=33", "dc_kernels-pipelined@helpers=66"]
    assert vs[0].model_s is not None


def test_variants_from_the_launchers_set_those_launches():
    # under the interpreter (its configs and 3 SMs): the list read off the launchers, each
    # pipelined variant's switches giving exactly that launch
    from dc_kernels.ops import linear as linear_ops
    from dc_kernels.ops import pipelined
    inputs = make_inputs(Case(SHAPES["clip336-4096"], 1), torch.bfloat16, CPU)
    vs = sweep.variants(inputs)
    names = _names(vs)
    # most telling first: the anchors and each path's rule, then helpers, whole tiles,
    # programs, the two-pass GEMM's stream K
    assert names[:4] == ["dc_kernels", "dc_kernels+cublas", "dc_kernels-pipelined",
                         "dc_kernels-two-pass"]
    kinds = [("helpers" in n) * 1 + ("stream_k" in n or "nosplit" in n) * 2
             + ("programs" in n) * 3 + ("split_iters" in n) * 4 for n in names[4:]]
    assert kinds == sorted(kinds) and "dc_kernels-two-pass-nosplit" in names
    hs, spec = inputs.hidden_states, inputs.spec
    B, T, C = hs[spec.final_layer].shape
    switched = [n for n in names if n.startswith("dc_kernels-pipelined@")]
    assert switched
    for name in switched:
        sw = providers.split_provider(name)[1]
        seen = {}

        def prepare():
            launch = linear_ops.prepare_linear(hs, spec, B, T, C, inputs.w1, inputs.b1,
                                               "gelu", path="pipelined").pipelined
            seen.update(programs=launch.programs, helpers=launch.helpers)
            return ()
        providers._with_switches(prepare, sw)()
        if "programs" in sw:
            assert seen["programs"] == sw["programs"]
        if "helpers" in sw:
            assert seen["helpers"] == sw["helpers"]
        if sw.get("stream_k") == 0:
            assert seen["programs"] == 0
    assert pipelined.STREAM_K_PROGRAMS == 0 and pipelined.HELPER_PROGRAMS == 0


SCI = ("clip336-4096-sci", 1)


def test_sweep_on_the_cpu_writes_what_it_measured(tmp_path):
    # real providers: the auto path (torch here) is measured, the Triton variants are listed
    # as not run; the files say which case and variants
    rc = sweep.run_sweep(str(tmp_path), lambda s: None, budget_s=120, device=CPU,
                         dtype=torch.float32, cases=[SCI])
    assert rc == 0
    (md,) = [p for p in os.listdir(tmp_path) if p.endswith("-sweep.md")]
    data = json.loads((tmp_path / md.replace(".md", ".json")).read_text())
    assert data["sweep"] and data["complete"]
    assert [r["provider"] for r in data["rows"]] == ["dc_kernels"]
    assert data["rows"][0]["err_over_bound"] <= 1.0
    (case,) = data["variants"]
    assert (case["shape"], case["images"]) == SCI
    listed = [v["provider"] for v in case["variants"]]
    assert listed[0] == "dc_kernels" and len(listed) > 1
    assert all(any(s.startswith(f"linear/clip336-4096-sci/1img/{p}:") for s in data["skipped"])
               for p in listed[1:])
    text = (tmp_path / md).read_text()
    assert "### clip336-4096-sci, 1 image (linear, float32)" in text and "not run" in text


def test_sweep_budget_and_a_failing_variant(tmp_path, monkeypatch):
    # no case starts after the budget: exit 4, the note says which; a variant with a wrong
    # result is recorded as failed (exit 1) and the run goes on
    rc = sweep.run_sweep(str(tmp_path / "a"), lambda s: None, budget_s=1e-6, device=CPU,
                         dtype=torch.float32, cases=[SCI])
    assert rc == 4
    (js,) = [p for p in os.listdir(tmp_path / "a") if p.endswith(".json")]
    notes = json.loads((tmp_path / "a" / js).read_text())["notes"]
    assert any("not run, the time budget" in n for n in notes)

    wrong_dc_kernels(monkeypatch)
    two = [sweep.Variant("dc_kernels", "wrong on purpose"),
           sweep.Variant("dc_kernels-inline", "the torch path inline")]
    rc = sweep.run_sweep(str(tmp_path / "b"), lambda s: None, budget_s=120, device=CPU,
                         dtype=torch.float32, cases=[SCI], variants_of=lambda inputs: two)
    assert rc == 1
    (js,) = [p for p in os.listdir(tmp_path / "b") if p.endswith(".json")]
    data = json.loads((tmp_path / "b" / js).read_text())
    assert [r["provider"] for r in data["rows"]] == ["dc_kernels-inline"]
    assert data["failures"] and "dc_kernels" in data["failures"][0]


def test_sweep_refuses_bad_arguments_and_the_cpu(monkeypatch, capsys):
    for kw in (dict(budget_s=0), dict(row_timeout_s=-1)):
        with pytest.raises(ValueError, match="positive number of seconds"):
            sweep.run_sweep(None, lambda s: None, device=CPU, **kw)
    with pytest.raises(ValueError, match="unknown shape 'clip999'"):
        sweep.run_sweep(None, lambda s: None, device=CPU, cases=[("clip999", 1)])
    with pytest.raises(ValueError, match="images must be an int >= 1"):
        sweep.run_sweep(None, lambda s: None, device=CPU, cases=[("clip336-4096", 0)])
    if not torch.cuda.is_available():
        assert sweep.run_sweep(None, lambda s: None) == 2
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert cli_main(["--sweep"]) == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli_main(["--sweep"]) == 2
    assert cli_main(["--sweep", "--sweep-budget", "0"]) == 2
    assert "positive number of seconds" in capsys.readouterr().err
