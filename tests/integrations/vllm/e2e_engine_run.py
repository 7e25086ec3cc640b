"""One vLLM CPU engine run for the end-to-end tests (executed as a subprocess; not a test module).

argv[1]: JSON config {model, tp, plugin (loaded), extension (worker extension set; default: plugin), chat: [[ids...]], max_tokens, round: {...} | null, nonces,
bad_prefix_nonce, validate_nonces, extra: {...}}. Prints one line ``E2E_RESULT <json>``.
"""
import json
import os
import sys
import time


async def run_async(cfg, kwargs):
    """AsyncLLM: chat requests streamed while AsyncCpoc admits nonces as the governor allows."""
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    from cpoc_kernels.governor import GovernorConfig
    from cpoc_kernels.integrations.vllm.client import AsyncCpoc, PoCAdmission
    from cpoc_kernels.integrations.vllm.requests import PoCRound

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    try:
        cpoc = AsyncCpoc(engine)
        workers = await cpoc.check_ready()
        greedy = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, detokenize=False, ignore_eos=True)

        async def chat(i, ids):
            tokens = []
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), greedy, f"chat-{i}"):
                tokens = list(out.outputs[0].token_ids)
            return tokens

        round_ = PoCRound(**cfg["round"])
        admission = PoCAdmission(GovernorConfig(max_batch_tokens=32, kv_tokens_capacity=2048,
                                                poc_seq_len=round_.seq_len))
        results = await asyncio.gather(*(chat(i, ids) for i, ids in enumerate(cfg["chat"])),
                                       cpoc.run(round_, cfg["nonces"], admission=admission, max_in_flight=2))
        poc = results[-1]
        return {"workers": workers, "chat_tokens": results[:-1],
                "artifacts": {a.nonce: a.vector_b64 for a in poc.artifacts}, "refused": poc.refused,
                "governor": admission.governor.stats()["decisions"]}
    finally:
        engine.shutdown()


def main():
    cfg = json.loads(sys.argv[1])
    extension = cfg.get("extension", cfg["plugin"])
    if not cfg["plugin"]:
        os.environ["CPOC_VLLM_DISABLE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from cpoc_kernels.integrations.vllm import WORKER_EXTENSION
    from cpoc_kernels.integrations.vllm.client import CpocLLM, CpocNotReadyError
    from cpoc_kernels.integrations.vllm.requests import PoCRound, poc_request

    kwargs = dict(model=cfg["model"], skip_tokenizer_init=True, dtype="float32", enforce_eager=cfg.get("eager", True),
                  max_num_batched_tokens=32, max_num_seqs=8, max_model_len=128, tensor_parallel_size=cfg["tp"],
                  seed=0, enable_prefix_caching=True, **cfg.get("extra", {}))
    if cfg["tp"] > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if extension:
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
    result = {}
    if cfg.get("async"):
        import asyncio

        kwargs.pop("seed", None)
        print("E2E_RESULT " + json.dumps(asyncio.run(run_async(cfg, kwargs))), flush=True)
        return
    t0 = time.time()
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print("E2E_RESULT " + json.dumps({"startup_error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    result["startup_seconds"] = time.time() - t0
    chat = [TokensPrompt(prompt_token_ids=ids) for ids in cfg["chat"]]
    greedy = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, detokenize=False, ignore_eos=True)
    if not extension:
        outs = llm.generate(chat, greedy, use_tqdm=False)
        result["chat_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        try:
            CpocLLM(llm)
            result["ready_error"] = None
        except CpocNotReadyError as exc:
            result["ready_error"] = str(exc)
    else:
        client = CpocLLM(llm)
        result["workers"] = client.workers
        round_ = PoCRound(**cfg["round"])
        prompts, params = list(chat), [greedy] * len(chat)
        for nonce in cfg["nonces"]:
            p, s = poc_request(round_, nonce).to_vllm()
            prompts.append(p)
            params.append(s)
        if cfg.get("bad_prefix_nonce") is not None:  # prefix caching forced on a PoC request
            spec = poc_request(round_, cfg["bad_prefix_nonce"])
            kw = dict(spec.sampling_kwargs, skip_reading_prefix_cache=False)
            prompts.append(TokensPrompt(**spec.prompt))
            params.append(SamplingParams(**kw))
        t1 = time.time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        result["generate_seconds"] = time.time() - t1
        result["chat_tokens"] = [list(o.outputs[0].token_ids) for o in outs[: len(chat)]]
        result["poc_outputs"] = [[list(o.outputs[0].token_ids), o.outputs[0].finish_reason] for o in outs[len(chat):]]
        per_rank = llm.collective_rpc("cpoc_drain")
        result["records_per_rank"] = per_rank
        result["stats"] = [{k: v for k, v in s.items() if k != "recent_steps"} for s in client.stats()]
        if cfg.get("validate_nonces"):
            res = client.compute(round_, cfg["validate_nonces"])
            result["validated"] = {a.nonce: a.vector_b64 for a in res.artifacts}
            result["validate_refused"] = res.refused
    print("E2E_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
