"""The global router under faults and odd input: one test per defect found against a loopback OpenAI server."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch
from conftest import LetterEmbedder, make_expert, tiny_llama
from fake_openai import FakeOpenAI
from peft import get_peft_model

from peft_glider import GliderConfig, GlobalRouter, OpenAIWriter, SamplesWriter
from peft_glider.global_router import InstructionWriter, InstructionWriterError, JsonCache

TASKS = {
    "add": [("add one and two", "3"), ("add four and five", "9"), ("add six and six", "12"), ("add two and two", "4")],
    "french": [("translate cat", "chat"), ("translate dog", "chien"), ("translate red", "rouge"), ("translate sun", "soleil")],
    "review": [("review dull film", "neg"), ("review lovely film", "pos"), ("review awful plot", "neg"), ("review fine cast", "pos")],
}


@pytest.fixture
def library(tmp_path):
    folders = [make_expert(tiny_llama, tmp_path / name, seed=i) for i, name in enumerate(TASKS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_llama(), GliderConfig(experts=folders, top_k=1, alpha="auto"))


class FailingWriter(InstructionWriter):
    """Writes like SamplesWriter, then fails from call `fail_from` on."""

    name = "failing"

    def __init__(self, fail_from: int) -> None:
        self.calls, self.fail_from = 0, fail_from

    def write(self, samples):
        self.calls += 1
        if self.calls >= self.fail_from:
            raise InstructionWriterError("scripted failure")
        return "Other words: " + SamplesWriter().write(samples)


# 1 ---------------------------------------------------------------------------------------------------------------
def test_describe_experts_is_all_or_nothing(library):
    glider, config = library.base_model, library.peft_config["default"]
    GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=None).describe_experts(library, TASKS)
    before = (glider.get_instruction_embeddings().clone(), config.auto_alpha_threshold,
              [e["instruction"] for e in config.experts], glider.global_router())
    failing = GlobalRouter(FailingWriter(fail_from=5), LetterEmbedder(), cache_dir=None)  # fails while calibrating
    with pytest.raises(InstructionWriterError, match="scripted failure"):
        failing.describe_experts(library, TASKS)
    assert torch.equal(glider.get_instruction_embeddings(), before[0])
    assert config.auto_alpha_threshold == before[1]
    assert [e["instruction"] for e in config.experts] == before[2]
    assert glider.global_router() is before[3]


# 2 ---------------------------------------------------------------------------------------------------------------
def _tiny_sentence_model(folder, seed: int) -> str:
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "cat"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder / "hf")
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder / "hf")
    SentenceTransformer(modules=[models.Transformer(str(folder / "hf")), models.Pooling(16)]).save(str(folder / "model"))
    return str(folder / "model")


def test_two_local_models_of_the_same_folder_name_never_share_cache_entries(tmp_path):
    from peft_glider import LocalModelWriter, SentenceTransformerEmbedder
    from peft_glider.global_router import RouteInfo

    a = SentenceTransformerEmbedder(_tiny_sentence_model(tmp_path / "a", seed=1))
    b = SentenceTransformerEmbedder(_tiny_sentence_model(tmp_path / "b", seed=2))
    assert a.name == b.name == "model" and a.cache_id != b.cache_id
    info = RouteInfo(instructions=[], scores=torch.empty(0))
    cache = tmp_path / "cache"
    first = GlobalRouter(SamplesWriter(), a, cache_dir=cache).embed(["hello world"], info)
    second = GlobalRouter(SamplesWriter(), b, cache_dir=cache).embed(["hello world"], info)
    torch.testing.assert_close(second, b.embed(["hello world"]))
    assert not torch.allclose(first, second)

    from conftest import tiny_chat_model

    for name in ("a", "b"):
        chat, tokenizer = tiny_chat_model()
        chat.save_pretrained(tmp_path / name / "chat")
        tokenizer.save_pretrained(tmp_path / name / "chat")
    writers = [LocalModelWriter(str(tmp_path / name / "chat")) for name in ("a", "b")]
    assert writers[0].name == writers[1].name and writers[0].cache_id != writers[1].cache_id


# 3 ---------------------------------------------------------------------------------------------------------------
def test_two_threads_writing_one_key_never_collide(tmp_path):
    cache = JsonCache(tmp_path / "cache")
    errors = []

    def write(value: int) -> None:
        try:
            for _ in range(300):
                cache.put("instructions", "k" * 64, f"text {value}")
        except OSError as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and cache.get("instructions", "k" * 64) in ("text 0", "text 1")
    assert not list((tmp_path / "cache").rglob("*.partial*"))  # nothing half-written left behind


# 4 ---------------------------------------------------------------------------------------------------------------
def test_an_unwritable_cache_warns_once_and_keeps_the_paid_instruction(tmp_path, library):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with FakeOpenAI() as server:
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01)
        router = GlobalRouter(writer, LetterEmbedder(), cache_dir=blocker / "cache")
        with pytest.warns(UserWarning, match=f"Cannot write the global router's cache in {blocker / 'cache'}") as caught:
            router.describe_experts(library, TASKS)
            with library.base_model.route("add three and four") as info:
                pass
    assert len([w for w in caught if "Cannot write" in str(w.message)]) == 1
    assert info.scores.shape == (1, 3) and info.llm_calls == 1
    assert len(server.requests) == 3 + 3 + 1  # every instruction asked for once, none lost to the cache error


# 5 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, value", [
    ("embeddings", ["a", "b"]), ("embeddings", [[1.0, 2.0]]), ("embeddings", "NaN"), ("embeddings", [1.0] * 3),
    ("instructions", 42), ("instructions", ["nested", ["list"]]), ("instructions", "   "),
])
def test_cache_entries_of_the_wrong_shape_are_ignored_naming_the_file(tmp_path, library, kind, value):
    cache = tmp_path / "cache"
    router = GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=cache)
    router.describe_experts(library, TASKS)
    expected = library.base_model.get_instruction_embeddings().clone()
    files = sorted((cache / kind).rglob("*.json"))
    payload = [float("nan")] * 26 if value == "NaN" else value
    for path in files:
        path.write_text(json.dumps({"value": payload}))  # valid JSON (NaN included), wrong content
    with pytest.warns(UserWarning, match=f"cache file {files[0].parent}"):
        GlobalRouter(SamplesWriter(), LetterEmbedder(), cache_dir=cache).describe_experts(library, TASKS)
    torch.testing.assert_close(library.base_model.get_instruction_embeddings(), expected)
    with library.base_model.route(["add one and one"]) as info:
        assert torch.isfinite(info.scores).all()


# 6 ---------------------------------------------------------------------------------------------------------------
def test_a_prompt_with_a_lone_surrogate_routes(tmp_path, library):
    with FakeOpenAI() as server:
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01)
        router = GlobalRouter(writer, LetterEmbedder(), cache_dir=tmp_path / "cache")
        router.describe_experts(library, TASKS)
        with library.base_model.route(["add abc\ud800def", "translate \udfffcat"]) as info:
            pass
    assert info.scores.shape == (2, 3) and torch.isfinite(info.scores).all()
    assert "\ufffd" in server.requests[-1]["body"]["messages"][-1]["content"]


def test_an_instruction_with_a_lone_surrogate_is_sanitized_like_prompts(tmp_path, library):
    class BadDecode(InstructionWriter):
        name = "bad-decode"

        def write(self, samples):
            return "ok \udcff " + str(samples)[:20]

    router = GlobalRouter(BadDecode(), LetterEmbedder(), cache_dir=tmp_path / "cache")
    instructions = router.describe_experts(library, TASKS)
    assert all(text.startswith("ok \ufffd ") for text in instructions.values())
    with library.base_model.route(["add one and one"]) as info:
        assert info.instructions[0].startswith("ok \ufffd ") and torch.isfinite(info.scores).all()
    # cached as written: a second router reads the same texts back without calling the writer
    again = GlobalRouter(BadDecode(), LetterEmbedder(), cache_dir=tmp_path / "cache")
    assert again.describe_experts(library, TASKS) == instructions


# 7 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply", ["", "   \n", None])
def test_a_writer_returning_no_text_is_an_error_naming_the_expert(library, reply):
    class Blank(InstructionWriter):
        name = "blank"

        def write(self, samples):
            return reply if "cat" in str(samples) else "An instruction."

    with pytest.raises(InstructionWriterError, match=r"'blank' returned .* for expert 'french': an instruction must"):
        GlobalRouter(Blank(), LetterEmbedder(), cache_dir=None).describe_experts(library, TASKS)
    assert library.base_model.get_instruction_embeddings() is None  # nothing stored


# 8 ---------------------------------------------------------------------------------------------------------------
def test_route_with_one_string_is_one_prompt(library):
    with FakeOpenAI() as server:
        writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01)
        router = GlobalRouter(writer, LetterEmbedder(), cache_dir=None)
        router.describe_experts(library, TASKS)
        asked = len(server.requests)
        with library.base_model.route("add seven and one", router=router) as info:
            pass
    assert len(server.requests) == asked + 1 and info.scores.shape == (1, 3) and len(info.instructions) == 1


# 9 ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [{"max_tokens": 50}, {"system_prompt": "You summarize tasks in five words."}])
def test_changed_writer_settings_do_not_reuse_cached_instructions(tmp_path, library, change):
    with FakeOpenAI() as server:
        def router(**settings):
            writer = OpenAIWriter("writer", base_url=server.base_url, api_key="k", backoff=0.01, **settings)
            return GlobalRouter(writer, LetterEmbedder(), cache_dir=tmp_path / "cache")

        router().describe_experts(library, TASKS, calibrate=False)
        router().describe_experts(library, TASKS, calibrate=False)
        assert len(server.requests) == 3  # same settings: served from the cache
        router(**change).describe_experts(library, TASKS, calibrate=False)
        assert len(server.requests) == 6
    key = "max_tokens" if "max_tokens" in change else "messages"
    sent = server.requests[-1]["body"][key]
    assert sent == 50 if key == "max_tokens" else sent[0]["content"] == change["system_prompt"]
