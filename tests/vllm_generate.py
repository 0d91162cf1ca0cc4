"""Greedy tokens from a vLLM engine in a process of its own (tests/test_vllm.py: engines under another environment,
e.g. Model Runner V2 or a vLLM with a point missing).

    python tests/vllm_generate.py SPEC.json

SPEC: {"base": folder, "new_tokens": n, "engine": {LLM keyword arguments}, "requests": [{"prompt": text,
"lora": [name, int id, folder] or null, "extra": extra_args or null}, ...]}. Prints one line `RESULT <json>`: per
request its tokens, or {"error": message} when vLLM refused it (each request is first submitted alone, to see
which are refused, then all the others together, in one engine batch, for their tokens).
"""

import json
import sys

if __name__ == "__main__":
    import vllm
    from vllm.lora.request import LoRARequest

    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    llm = vllm.LLM(model=spec["base"], **spec["engine"])

    def params(request):
        return vllm.SamplingParams(temperature=0, max_tokens=spec["new_tokens"], ignore_eos=True,
                                   extra_args=request.get("extra") or None)

    def lora(request):
        return None if request.get("lora") is None else LoRARequest(*request["lora"])

    results = []
    for request in spec["requests"]:  # which requests vLLM refuses, one at a time
        try:
            llm.generate([request["prompt"]], params(request), lora_request=lora(request), use_tqdm=False)
            results.append(None)
        except ValueError as error:
            results.append({"error": str(error)})
    served = [i for i, result in enumerate(results) if result is None]
    requests = [spec["requests"][i] for i in served]
    outputs = llm.generate([r["prompt"] for r in requests], [params(r) for r in requests],
                           lora_request=[lora(r) for r in requests], use_tqdm=False)  # all together: one batch
    for i, output in zip(served, outputs):
        results[i] = list(output.outputs[0].token_ids)
    print("RESULT " + json.dumps(results), flush=True)
