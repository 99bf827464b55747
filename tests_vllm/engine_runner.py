"""Run vLLM engines on model directories, one after the other, and write what they generated.

Usage: ``python engine_runner.py JOBS.json OUT.json``. JOBS is a list of jobs, run one after
the other in this process (vLLM imported once, each engine shut down before the next); each
holds ``model`` (a directory), ``requests`` (``[{"prompt": str, "images": [seed, ...]}]``,
images made by ``fixture.image(seed)``), ``max_tokens``, ``logprobs`` and ``llm_kwargs`` (extra
``vllm.LLM`` arguments). OUT gets one entry per job: ``{"ok": true, "archs_has_dc", "start_s",
"results": [{"prompt_token_ids", "token_ids", "logprobs": [[[token_id, logprob, rank], ...]
per step]}]}`` or, if the engine refused the model, ``{"ok": false, "error_type", "error"}``
(the whole exception chain). OUT is rewritten after each job.

The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the caller sets
it), so a load-time error reaches this script as the exception the model raised; the test runs
this script as a child process, so vLLM never shares a process with the reference.
"""

import json
import os
import sys
import time
import traceback


def main(jobs_path: str, out_path: str) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with open(jobs_path) as f:
        jobs = json.load(f)
    outs = []
    for job in jobs:
        outs.append(run_job(job))
        with open(out_path, "w") as f:  # after each job: a crash keeps the earlier results
            json.dump(outs, f)
    return 0


def run_job(job: dict) -> dict:
    """One engine: build it, generate, report (or report why it refused the model)."""
    import gc
    import fixture
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    out = {"model": job["model"]}
    llm = None
    try:
        t0 = time.perf_counter()
        kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=256,
                      kv_cache_memory_bytes=64 << 20, seed=0)
        kwargs.update(job.get("llm_kwargs", {}))
        llm = LLM(model=job["model"], **kwargs)
        out["start_s"] = time.perf_counter() - t0
        from vllm import ModelRegistry
        out["archs_has_dc"] = "DenseConnectorLlavaForConditionalGeneration" in \
            ModelRegistry.get_supported_archs()
        params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8),
                                logprobs=job.get("logprobs", 5), ignore_eos=True)
        prompts = []
        for req in job["requests"]:
            p = {"prompt": req["prompt"]}
            if req.get("images"):
                p["multi_modal_data"] = {"image": [fixture.image(s) for s in req["images"]]}
            prompts.append(p)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        out["generate_s"] = time.perf_counter() - t0
        results = []
        for o in outputs:
            comp = o.outputs[0]
            steps = []
            for lp in comp.logprobs:
                steps.append(sorted(([int(t), float(v.logprob), int(v.rank)]
                                     for t, v in lp.items()), key=lambda x: x[2]))
            results.append({"prompt_token_ids": list(o.prompt_token_ids),
                            "token_ids": list(comp.token_ids), "logprobs": steps})
        out.update(ok=True, results=results)
    except Exception as e:  # report the refusal to the test
        chain, c = [], e
        while c is not None and len(chain) < 10:
            chain.append(f"{type(c).__name__}: {c}")
            c = c.__cause__ or c.__context__
        out.update(ok=False, error_type=type(e).__name__, error="\n".join(chain),
                   traceback=traceback.format_exc())
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
