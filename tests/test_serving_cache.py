"""The conversation prefix cache (chatapp.serving.cache) on the real demo model: greedy replies are
the same with and without it over several turns, images, regenerate and edit, across adapter
switches and a rollback; follow-ups reuse what earlier turns computed; the bytes it holds stay
within its budget."""
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from chatapp.core.config import validate_generation
from chatapp.demo import shapes
from chatapp.serving.cache import ServingCache, tensor_bytes
from chatapp.serving.engine import Engine

GREEDY = validate_generation(temperature=0, max_new_tokens=24)
TARGETS = r".*text_model.*\.(q_proj|v_proj)"


def image(seed: int):
    return shapes.render(shapes.random_scene(random.Random(seed)))


def user(text: str, *images) -> dict:
    parts = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def reply_of(engine, conversation, **kwargs):
    reply = engine.generate(conversation, GREEDY, **kwargs)
    return reply.text, reply.meta.reply_tokens, reply.meta.finish_reason, reply.meta.adapter


def chat(engine, turns, versions=None):
    """Play `turns` ((question, images) each), answering turn i from adapter versions[i]; returns the replies."""
    conversation, replies = [], []
    for index, (question, images) in enumerate(turns):
        if versions is not None:
            engine.use_adapter(*versions[index])
        conversation.append(user(question, *images))
        replies.append(reply_of(engine, conversation))
        conversation.append(answer(replies[-1][0]))
    return replies


def held_bytes(cache: ServingCache) -> int:
    """The bytes behind every tensor the cache holds, counted from the tensors themselves."""
    tensors = []
    for value, _ in cache._entries.values():
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        else:
            tensors += [t for layer in value.cache.layers for t in (layer.keys, layer.values)]
    return tensor_bytes(tensors)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA versions with random B weights (each changes the answers), saved by plain peft."""
    folders = {}
    for seed, version in enumerate(["v1", "v2"]):
        base = Engine.load("demo").model
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
        folders[version] = tmp_path_factory.mktemp(version) / "adapter"
        model.save_pretrained(folders[version])
    return folders


TURNS = [("What shape is it?", [image(1)]), ("How many shapes are there?", []),
         ("What color is the circle?", [image(2)]), ("Is there a red square?", []),
         ("How many shapes are there?", [image(1)]), ("What shape is it?", [])]


def test_greedy_replies_are_the_same_with_and_without_the_cache_over_several_turns():
    engine = Engine.load("demo")
    engine.cache = None
    plain = chat(engine, TURNS)
    engine.cache = ServingCache(64 * 2**20)
    cached = chat(engine, TURNS)
    assert cached == plain
    stats = engine.cache.stats
    assert stats["prefix_hits"] == len(TURNS) - 1 and stats["reused_tokens"] > 200  # every follow-up reused
    assert stats["image_hits"] == 1  # image(1) sent again in turn 5: its features were kept


def test_seeded_sampled_replies_are_the_same_with_and_without_the_cache():
    engine = Engine.load("demo")
    sampled = validate_generation(temperature=1.0, top_k=0, seed=7, max_new_tokens=24)
    conversation = [user("What shape is it?", image(4)), answer("A circle."), user("How many shapes are there?")]
    engine.cache = None
    plain = [engine.generate(conversation[:1], sampled).text, engine.generate(conversation, sampled).text]
    engine.cache = ServingCache(64 * 2**20)
    cached = [engine.generate(conversation[:1], sampled).text, engine.generate(conversation, sampled).text]
    assert cached == plain and engine.cache.stats["prefix_hits"] == 1


def test_regenerate_and_edit_reuse_the_prefix_they_share():
    engine = Engine.load("demo")
    start = [user("What shape is it?", image(3)), answer("A circle."), user("How many shapes are there?")]
    edited = start[:2] + [user("What color is it?")]
    engine.cache = None
    plain = [reply_of(engine, start), reply_of(engine, start), reply_of(engine, edited)]
    engine.cache = ServingCache(64 * 2**20)
    first = reply_of(engine, start)
    reused_before = engine.cache.stats["reused_tokens"]
    assert [first, reply_of(engine, start), reply_of(engine, edited)] == plain
    # the regenerate reused all of the prompt but its last token; the edit all but its own question
    prompt_tokens = engine.generate(start, GREEDY).meta.prompt_tokens
    assert engine.cache.stats["reused_tokens"] - reused_before >= prompt_tokens - 1 + 20


def test_a_cache_is_never_used_by_another_adapter_version(adapters):
    engine = Engine.load("demo")
    # base, v1, v2, back to v1 (a rollback), the base again, v2 again
    versions = [(None,), ("v1", adapters["v1"]), ("v2", adapters["v2"]), ("v1", adapters["v1"]), (None,),
                ("v2", adapters["v2"])]
    engine.cache = None
    plain = chat(engine, TURNS, versions)
    assert [r[3] for r in plain] == [None, "v1", "v2", "v1", None, "v2"]
    engine.cache = ServingCache(64 * 2**20)
    cached = chat(engine, TURNS, versions)
    assert cached == plain
    # each version reused only its own earlier turns: the rollback to v1 and the return to the base
    # and to v2 found their own prefixes; the first turn on each version found none
    stats = engine.cache.stats
    assert stats["prefix_misses"] == 3 and stats["prefix_hits"] == 3
    # and the answers depend on the version: a cache from another one would have changed them
    engine.cache = None
    engine.use_adapter(None)
    assert chat(engine, TURNS) != plain


def test_bytes_held_stay_within_the_budget_over_50_conversations():
    engine = Engine.load("demo")
    budget = 400_000  # a few demo conversations: most of the 50 are evicted and recomputed
    engine.cache = ServingCache(budget)
    conversations, replies, rng = [], [], random.Random(5)
    for n in range(50):
        conversations.append([(shapes.random_example(rng).question, [image(100 + n)]),
                              ("How many shapes are there?", [])])
        replies.append(chat(engine, conversations[-1]))
        assert engine.cache.nbytes <= budget and held_bytes(engine.cache) <= budget
        assert held_bytes(engine.cache) == engine.cache.nbytes  # its own count is the tensors' true size
    assert engine.cache.stats["prefix_hits"] >= 50  # follow-ups reused their conversation while it stayed
    assert len(engine.cache) < 3 * 10  # most conversations were evicted
    # an evicted conversation is simply recomputed: the same replies as the plain path
    reused = engine.cache.stats["reused_tokens"]
    assert chat(engine, conversations[0][:1]) == replies[0][:1]
    # long evicted: only the template's opening, shared by every conversation, was found again
    assert engine.cache.stats["reused_tokens"] - reused < 8
    again = chat(engine, conversations[0])
    engine.cache = None
    assert again == replies[0] == chat(engine, conversations[0])
