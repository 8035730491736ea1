"""Concurrent replies batched (chatapp/serving/batching.py) on the real demo model: each reply is the
one generated alone through plain generate() (greedy, and sampled with a seed), from its own adapter
version; a stopped reply frees its row for a waiting one and leaves the others alone; a request that
arrives mid-flight starts before the running replies end."""
import random
import threading
import time

import pytest

from chatapp.core.config import validate_generation
from chatapp.demo import shapes
from chatapp.serving.engine import Engine
from chatapp.serving.streaming import StopSignal
from support import random_lora_folders


def conversation(seed: int, with_image: bool = True) -> list[dict]:
    example = shapes.random_example(random.Random(seed), "describe")
    parts = [{"type": "image", "image": shapes.render(example.scene)}] if with_image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": example.question}]}]


def alone(engine, messages, params, **kwargs):
    """The reply through plain generate(), one reply at a time."""
    engine.batching = False
    try:
        return engine.generate(messages, params, **kwargs)
    finally:
        engine.batching = True


def concurrently(engine, jobs, queued_together: bool = False):
    """Start every job (messages, params, kwargs) at once in its own thread; their replies in order.
    `queued_together`: the generation thread is kept busy until every request waits in the batcher,
    so that it takes them all at once (a joint prefill where `prefill_rows` allows)."""
    replies, errors = {}, []
    start, gate = threading.Barrier(len(jobs)), threading.Event()
    if queued_together:
        engine.generation_thread.submit(gate.wait)

    def worker(index, messages, params, kwargs):
        try:
            start.wait()
            replies[index] = engine.generate(messages, params, **kwargs)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    if queued_together:
        deadline = time.monotonic() + 30
        while engine.batcher.waiting < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
    for thread in threads:
        thread.join()
    assert not errors
    return [replies[i] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def engine():
    engine = Engine.load("demo")
    assert engine.batching  # the default on this model
    return engine


def test_greedy_replies_batched_together_are_each_the_reply_generated_alone(engine):
    # prompts of different lengths (padding), with and without images; some run to max_new_tokens,
    # others end on their own end-of-utterance while the rest go on
    jobs = []
    for seed in range(6):
        overrides = {"generate_overrides": {"min_new_tokens": 20}} if seed % 2 else {}
        params = validate_generation(temperature=0, max_new_tokens=20 + 4 * seed)
        jobs.append((conversation(seed, with_image=seed != 3), params, overrides))
    expected = [alone(engine, *job[:2], **job[2]) for job in jobs]
    engine.batcher.largest_batch = 0
    batched = concurrently(engine, jobs)
    assert engine.batcher.largest_batch >= 3  # they really shared decode steps
    assert [r.text for r in batched] == [r.text for r in expected]
    assert [(r.meta.reply_tokens, r.meta.finish_reason, r.meta.prompt_tokens) for r in batched] == \
        [(r.meta.reply_tokens, r.meta.finish_reason, r.meta.prompt_tokens) for r in expected]
    assert {r.meta.finish_reason for r in batched} == {"stop", "length"}
    for reply in batched:
        assert reply.meta.adapter is None and reply.meta.time_to_first_token_s > 0


def test_seeded_sampled_replies_do_not_depend_on_the_rows_beside_them(engine):
    jobs = [(conversation(10 + i), validate_generation(temperature=1.0, top_k=0, top_p=0.95 if i % 2 else 1.0,
                                                       seed=100 + i % 3, max_new_tokens=32),
             {"generate_overrides": {"min_new_tokens": 32}}) for i in range(6)]
    expected = [alone(engine, *job[:2], **job[2]).text for job in jobs]
    assert len(set(expected)) > 1  # the seeds and prompts really drive the samples
    assert [r.text for r in concurrently(engine, jobs)] == expected
    # the same seeded request twice in one batch, beside others: the same reply both times
    twice = concurrently(engine, [jobs[0], jobs[1], jobs[0], jobs[2]])
    assert twice[0].text == twice[2].text == expected[0]


def engine_with_two_versions(tmp_path):
    """The demo model with adapter versions v1 and v2 loaded (answering differently); the default is the base."""
    engine = Engine.load("demo")
    v1, _ = random_lora_folders(engine.model, tmp_path / "v1", scale=0.3)
    v2, _ = random_lora_folders(engine.model, tmp_path / "v2", scale=0.6)
    engine.use_adapter("v1", v1)
    engine.use_adapter("v2", v2)
    engine.use_adapter(None)
    return engine


def test_concurrent_users_get_their_own_reply_from_their_own_adapter_version(tmp_path):
    engine = engine_with_two_versions(tmp_path)
    greedy = validate_generation(temperature=0, max_new_tokens=24)
    versions = [None, "v1", "v2", "v1", "v2", None]
    jobs = [(conversation(20 + i), greedy, {"adapter": version, "generate_overrides": {"min_new_tokens": 24}})
            for i, version in enumerate(versions)]
    expected = [alone(engine, *job[:2], **job[2]) for job in jobs]
    # the versions answer differently: a row answered by another version would show
    same_prompt = [alone(engine, jobs[0][0], greedy, adapter=v).text for v in (None, "v1", "v2")]
    assert len(set(same_prompt)) == 3
    engine.batcher.largest_batch = 0
    batched = concurrently(engine, jobs)
    assert engine.batcher.largest_batch >= 3  # a mixed batch: peft's per-row adapter_names
    assert [r.meta.adapter for r in batched] == versions
    assert [r.text for r in batched] == [r.text for r in expected]


def stream_in_thread(engine, messages, params, stop=None, **kwargs):
    """Consume a stream in a thread; returns (thread, events list, first-event flag)."""
    events, started = [], threading.Event()

    def consume():
        for event in engine.stream(messages, params, stop=stop, **kwargs):
            events.append(event)
            started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    return thread, events, started


def long_reply(engine, number: int, tokens: int, stop=None):
    """A greedy reply of exactly `tokens` tokens streaming in a thread, returned once its first token is
    out: (thread, events)."""
    params = validate_generation(temperature=0, max_new_tokens=tokens)
    thread, events, started = stream_in_thread(engine, conversation(number), params, stop=stop,
                                               generate_overrides={"min_new_tokens": tokens})
    assert started.wait(60)
    return thread, events


def test_a_stopped_reply_frees_its_row_for_a_waiting_one_and_the_others_finish():
    engine = Engine.load("demo")
    engine.batcher.max_batch_size = 2
    tokens = 120
    params = validate_generation(temperature=0, max_new_tokens=tokens)
    long = {"generate_overrides": {"min_new_tokens": tokens}}
    expected = {name: alone(engine, conversation(seed), params, **long).text for name, seed in (("b", 31), ("c", 32))}
    stop_a = StopSignal()
    a, a_events = long_reply(engine, 30, tokens, stop=stop_a)
    b, b_events = long_reply(engine, 31, tokens)
    c, c_events, _ = stream_in_thread(engine, conversation(32), params, **long)
    while engine.batcher.rows + engine.batcher.waiting < 3 and not c_events:  # until c has been submitted
        threading.Event().wait(0.01)
    assert not c_events  # two rows at most: c waits
    stop_a.set()
    for thread in (a, b, c):
        thread.join(120)
    a_meta, b_meta, c_meta = (events[-1].meta for events in (a_events, b_events, c_events))
    assert a_meta.finish_reason == "stopped"
    assert a_meta.reply_tokens <= a_meta.stop_requested_at_token + 1 < tokens
    # a's row went to c, which started while b was still running, and b went on untouched
    c_first = c_events[0].token_times[0]
    assert c_first < b_events[-2].token_times[-1]
    assert (b_meta.finish_reason, b_meta.reply_tokens, c_meta.reply_tokens) == ("length", tokens, tokens)
    assert (b_events[-1].text, c_events[-1].text) == (expected["b"], expected["c"])
    assert engine.batcher.largest_batch == 2 and engine.batcher.rows == 0


def test_a_request_stopped_while_waiting_for_a_row_ends_without_waiting_for_one():
    engine = Engine.load("demo")
    engine.batcher.max_batch_size = 1
    tokens = 300
    params = validate_generation(temperature=0, max_new_tokens=tokens)
    running, running_events = long_reply(engine, 50, tokens)
    stop = StopSignal()
    waiting, waiting_events, _ = stream_in_thread(engine, conversation(51), params, stop=stop)
    while engine.batcher.waiting < 1:
        threading.Event().wait(0.01)
    stop.set()
    waiting.join(30)
    assert not waiting.is_alive() and running.is_alive()  # it ended while the only row was still taken
    meta = waiting_events[-1].meta
    assert (meta.reply_tokens, meta.finish_reason, meta.time_to_first_token_s) == (0, "stopped", None)
    running.join(120)
    assert running_events[-1].meta.reply_tokens == tokens


def test_a_reply_that_cannot_be_batched_runs_while_batched_ones_stream(engine):
    # a generate() argument the batcher does not apply: that reply goes through generate(), the
    # batched one waits for it between two steps, and both end (no deadlock on the generation thread)
    tokens = 200
    batched, batched_events = long_reply(engine, 60, tokens)
    unbatched_params = validate_generation(temperature=0, max_new_tokens=12)
    unbatched = {}
    worker = threading.Thread(target=lambda: unbatched.setdefault("reply", engine.generate(
        conversation(61), unbatched_params, generate_overrides={"no_repeat_ngram_size": 2})))
    worker.start()
    worker.join(60)
    batched.join(120)
    assert not worker.is_alive() and not batched.is_alive()
    assert batched_events[-1].meta.reply_tokens == tokens
    expected = alone(engine, conversation(61), unbatched_params, generate_overrides={"no_repeat_ngram_size": 2})
    assert unbatched["reply"].text == expected.text


def test_a_request_arriving_mid_flight_starts_and_ends_before_the_running_reply_ends(engine):
    tokens = 300
    running, running_events = long_reply(engine, 40, tokens)
    short_params = validate_generation(temperature=0, max_new_tokens=8)
    assert running.is_alive()
    short = list(engine.stream(conversation(41), short_params, generate_overrides={"min_new_tokens": 8}))
    short_ended = time.perf_counter()
    running.join(120)
    long_times = [t for event in running_events for t in event.token_times]
    short_times = [t for event in short for t in event.token_times]
    assert len(long_times) == tokens and len(short_times) == 8
    # the short reply ran beside the long one: it started and ended while the long one still produced
    # tokens, which went on between its tokens (a queued reply would have waited for all 300)
    assert long_times[0] < short_times[0] and short_ended < long_times[-1]
    assert any(short_times[0] < t < short_times[-1] for t in long_times)
    assert short[-1].text == alone(engine, conversation(41), short_params,
                                   generate_overrides={"min_new_tokens": 8}).text


def test_a_batched_reply_honours_the_models_own_min_new_tokens():
    # a model whose generation config says min_new_tokens: generate() honours it, so must a batched row
    # (test_faults_chat's slow model ended its answer at once when batched, before this was mended)
    engine = Engine.load("demo")
    engine.model.generation_config.min_new_tokens = 40
    params = validate_generation(temperature=0, max_new_tokens=60)
    batched = engine.generate(conversation(70), params)
    assert batched.meta.reply_tokens >= 40
    assert batched.text == alone(engine, conversation(70), params).text


def test_which_generation_configs_are_batched():
    from transformers import GenerationConfig

    from chatapp.serving.row_sampling import settings_batchable

    assert settings_batchable(GenerationConfig())
    assert settings_batchable(GenerationConfig(repetition_penalty=1.0, no_repeat_ngram_size=0))  # spelled-out neutral
    assert not settings_batchable(GenerationConfig(repetition_penalty=1.2))  # generate() would apply the model's own
    assert not settings_batchable(GenerationConfig(no_repeat_ngram_size=3))


def test_prompts_waiting_together_are_prefilled_in_one_pass_and_each_gets_its_reply_alone(engine):
    # new pictures (no cached features), questions of different lengths (left padding), and one
    # text-only prompt (other kinds of inputs: prefilled on its own)
    jobs = [(conversation(seed, with_image=seed != 503), validate_generation(temperature=0, max_new_tokens=12 + seed % 5),
             {}) for seed in range(500, 505)]
    engine.batcher.prefill_rows, engine.batcher.largest_prefill = 8, 0
    try:
        together = concurrently(engine, jobs, queued_together=True)
    finally:
        engine.batcher.prefill_rows = 1
    assert engine.batcher.largest_prefill == 4
    cache, engine.cache = engine.cache, None  # the plain path: every prompt computed on its own
    try:
        expected = [alone(engine, *job[:2], **job[2]) for job in jobs]
    finally:
        engine.cache = cache
    assert [r.text for r in together] == [r.text for r in expected]
    assert [(r.meta.reply_tokens, r.meta.prompt_tokens) for r in together] == \
        [(r.meta.reply_tokens, r.meta.prompt_tokens) for r in expected]
    # the joint pass kept each conversation's KV: its follow-up reuses it, with the same reply as uncached
    follow_up = jobs[0][0] + [{"role": "assistant", "content": [{"type": "text", "text": together[0].text}]},
                              {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]
    params = validate_generation(temperature=0, max_new_tokens=12)
    reused = engine.cache.stats["reused_tokens"]
    cached_reply = engine.generate(follow_up, params)
    assert engine.cache.stats["reused_tokens"] - reused >= together[0].meta.prompt_tokens
    engine.cache = None
    try:
        assert cached_reply.text == engine.generate(follow_up, params).text
    finally:
        engine.cache = cache


def test_prompts_prefilled_together_answer_from_each_ones_adapter_version(tmp_path):
    # one joint prefill pass with rows of the base and of two adapter versions (peft's per-row adapter_names)
    engine = engine_with_two_versions(tmp_path)
    greedy = validate_generation(temperature=0, max_new_tokens=16)
    versions = ["v2", None, "v1", "v2"]
    jobs = [(conversation(600 + i), greedy, {"adapter": version}) for i, version in enumerate(versions)]
    engine.batcher.prefill_rows = 4
    together = concurrently(engine, jobs, queued_together=True)
    assert engine.batcher.largest_prefill == 4
    engine.cache = None
    expected = [alone(engine, *job[:2], **job[2]) for job in jobs]
    assert len({alone(engine, jobs[0][0], greedy, adapter=v).text for v in (None, "v1", "v2")}) == 3
    assert [r.meta.adapter for r in together] == versions
    assert [r.text for r in together] == [r.text for r in expected]


def test_prefill_groups_keep_prompts_with_a_cached_prefix_alone_and_to_the_row_and_token_limits():
    import torch
    from transformers import DynamicCache

    from chatapp.serving.prefill import Prefill, prefill_groups

    def prompt(tokens, image=True, cached=False):
        past = DynamicCache()
        if cached:
            past.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
        inputs = {"pixel_values": torch.zeros(1, 1, 3, 4, 4)} if image else {}
        return Prefill(torch.zeros(1, tokens, dtype=torch.long), past, inputs, 8)

    ready = [("a", prompt(30)), ("b", prompt(30)), ("text", prompt(10, image=False)), ("cached", prompt(30, cached=True)),
             ("c", prompt(30)), ("d", prompt(30)), ("e", prompt(50))]
    names = lambda groups: [[name for name, _ in group] for group in groups]  # noqa: E731
    # a, b and c fill a pass's 3 rows; the text-only prompt and the one with a cached prefix go alone
    assert names(prefill_groups(ready, rows=3, tokens=100)) == [["a", "b", "c"], ["text"], ["cached"], ["d", "e"]]
    # at most 70 prompt tokens a pass
    assert names(prefill_groups(ready, rows=3, tokens=70)) == [["a", "b"], ["text"], ["cached"], ["c", "d"], ["e"]]
    assert names(prefill_groups(ready, rows=1, tokens=100)) == [[name] for name, _ in ready]
