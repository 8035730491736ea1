"""The engine on the real demo model (an Idefics3 model loaded through the Auto classes)."""
import random
import threading
import time

import pytest

from chatapp.core import config
from chatapp.demo import shapes
from chatapp.core.config import ParameterError, validate_generation
from chatapp.serving.engine import Engine, ModelLoadError, load_for_serving
from chatapp.serving.streaming import StopSignal

GREEDY = validate_generation(temperature=0, max_new_tokens=48)


def ask(engine, image, question, params=GREEDY, **kwargs):
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": question}]
    return engine.generate([{"role": "user", "content": content}], params, **kwargs)


def test_answers_questions_about_new_images(demo_engine):
    rng = random.Random(99)
    correct = 0
    for _ in range(20):
        ex = shapes.random_example(rng, "color")
        reply = ask(demo_engine, shapes.render(ex.scene), ex.question)
        correct += shapes.grade(ex, reply.text)
    assert correct >= 18


def test_reply_metadata(demo_engine):
    scene = shapes.random_scene(random.Random(3))
    reply = ask(demo_engine, shapes.render(scene), "How many shapes are there?")
    meta = reply.meta
    assert meta.model_id == "demo" and meta.adapter is None
    assert meta.prompt_tokens > 16 and meta.reply_tokens > 1
    assert meta.time_to_first_token_s > 0 and meta.tokens_per_s > 0
    assert meta.finish_reason == "stop" and meta.trimmed_messages == 0
    assert meta.params["temperature"] == 0 and isinstance(meta.seed, int)


def test_greedy_is_deterministic(demo_engine):
    image = shapes.render(shapes.random_scene(random.Random(5)))
    a = ask(demo_engine, image, "Describe the image.").text
    b = ask(demo_engine, image, "Describe the image.").text
    assert a == b and a


def test_same_seed_same_sampled_reply(demo_engine):
    image = shapes.render(shapes.random_scene(random.Random(6)))
    params = validate_generation(temperature=1.0, top_k=0, seed=1234, max_new_tokens=48)
    first = ask(demo_engine, image, "Describe the image.", params).text
    assert all(ask(demo_engine, image, "Describe the image.", params).text == first for _ in range(3))
    others = {ask(demo_engine, image, "Describe the image.",
                  validate_generation(temperature=1.0, top_k=0, seed=s, max_new_tokens=48)).text for s in range(8)}
    assert len(others) > 1  # the seed really drives sampling


def test_top_k_one_equals_greedy(demo_engine):
    rng = random.Random(8)
    for _ in range(5):
        ex = shapes.random_example(rng, "describe")
        image = shapes.render(ex.scene)
        greedy = ask(demo_engine, image, ex.question).text
        top1 = ask(demo_engine, image, ex.question,
                   validate_generation(temperature=1.5, top_k=1, max_new_tokens=48)).text
        assert top1 == greedy


def test_stop_ends_generation_within_one_token(demo_engine):
    image = shapes.render(shapes.random_scene(random.Random(9)))
    params = validate_generation(temperature=1.0, max_new_tokens=900, seed=1)
    for stop_after_events in (1, 3, 8):  # events come at most every 50 ms: ~24 in 900 tokens
        stop = StopSignal()
        events = 0
        final = None
        content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
        for event in demo_engine.stream([{"role": "user", "content": content}], params, stop=stop,
                                        generate_overrides={"min_new_tokens": 900}):
            events += 1
            if events == stop_after_events:
                stop.set()
            final = event
        meta = final.meta
        assert meta.finish_reason == "stopped"
        assert meta.stop_requested_at_token is not None
        assert meta.reply_tokens <= meta.stop_requested_at_token + 1 < 900


def test_closing_the_stream_stops_generation_and_frees_the_model(demo_engine):
    image = shapes.render(shapes.random_scene(random.Random(10)))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    stream = demo_engine.stream([{"role": "user", "content": content}],
                                validate_generation(temperature=1.0, max_new_tokens=900),
                                generate_overrides={"min_new_tokens": 900})
    next(stream)
    started = time.perf_counter()
    stream.close()  # returns once generate() has returned
    assert time.perf_counter() - started < 2
    assert demo_engine._lock.acquire(blocking=False)  # the model is free again
    demo_engine._lock.release()
    assert ask(demo_engine, image, "How many shapes are there?").text


def test_long_conversation_drops_oldest_turns_and_keeps_system_and_newest(demo_engine):
    small = Engine(demo_engine.model, demo_engine.processor, "demo", max_context_tokens=220)
    rng = random.Random(11)
    messages = []
    for _ in range(6):
        ex = shapes.random_example(rng, "count")
        messages.append({"role": "user", "content": [{"type": "image", "image": shapes.render(ex.scene)},
                                                     {"type": "text", "text": ex.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": ex.answer}]})
    last = shapes.random_example(rng, "color")
    messages.append({"role": "user", "content": [{"type": "image", "image": shapes.render(last.scene)},
                                                 {"type": "text", "text": last.question}]})
    params = validate_generation(temperature=0, max_new_tokens=40)
    inputs, dropped, room = small.prepare(messages, params, system_prompt="You answer questions about images.")
    prompt = small.processor.tokenizer.decode(inputs["input_ids"][0])
    assert dropped > 0 and dropped % 2 == 0
    assert prompt.startswith("<|im_start|>System: You answer questions about images.")
    assert last.question in prompt
    assert inputs["input_ids"].shape[1] <= 220 - 40 and room == 40
    reply = small.generate(messages, params, system_prompt="You answer questions about images.")
    assert reply.meta.trimmed_messages == dropped
    assert shapes.grade(last, reply.text)


def test_message_too_long_for_the_context_is_a_clear_error(demo_engine):
    small = Engine(demo_engine.model, demo_engine.processor, "demo", max_context_tokens=64)
    with pytest.raises(ParameterError, match="context"):
        small.generate([{"role": "user", "content": "hello " * 200}], GREEDY)


def test_reply_length_is_capped_by_the_context(demo_engine):
    small = Engine(demo_engine.model, demo_engine.processor, "demo", max_context_tokens=100)
    params = validate_generation(temperature=1.0, max_new_tokens=500, seed=0)
    reply = small.generate([{"role": "user", "content": "hello"}], params, generate_overrides={"min_new_tokens": 500})
    assert reply.meta.prompt_tokens + reply.meta.reply_tokens == 100
    assert reply.meta.finish_reason == "length"


def test_answers_without_an_image(demo_engine):
    reply = ask(demo_engine, None, "What can you do?")
    assert shapes.grade(shapes.Example("capabilities", "", "", "plain", None), reply.text)


def test_concurrent_callers_take_turns_and_get_their_own_replies(demo_engine):
    rng = random.Random(12)
    jobs = []
    for i in range(6):
        ex = shapes.random_example(rng, "describe")
        jobs.append((shapes.render(ex.scene), ex.question, validate_generation(temperature=1.0, seed=i, max_new_tokens=48)))
    expected = [ask(demo_engine, *job).text for job in jobs]
    results: dict[int, str] = {}
    errors = []

    def worker(i):
        try:
            results[i] = ask(demo_engine, *jobs[i]).text
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(len(jobs))] == expected


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "./no/such/folder", "not a model id!"])
def test_explicit_unknown_model_is_a_clear_error(name):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_for_serving(name)
    assert name in str(info.value)
    assert time.perf_counter() - started < 10  # no long hub retries


def test_default_model_falls_back_to_demo_offline_with_a_notice():
    result = load_for_serving(None)
    assert result.engine.model_id == "demo"
    assert config.DEFAULT_MODEL in result.notice and "demo model" in result.notice


def test_quantization_is_refused_without_cuda():
    with pytest.raises(ModelLoadError, match="CUDA"):
        Engine.load("demo", quantization="4bit")


def test_bad_messages_are_refused(demo_engine):
    with pytest.raises(ParameterError, match="end with a user message"):
        demo_engine.generate([{"role": "assistant", "content": "hi"}], GREEDY)
    with pytest.raises(ParameterError, match="role"):
        demo_engine.generate([{"role": "robot", "content": "hi"}], GREEDY)
    with pytest.raises(ParameterError, match="only user messages"):
        demo_engine.generate([{"role": "assistant", "content": [{"type": "image", "image": shapes.render(
            shapes.random_scene(random.Random(1)))}]}, {"role": "user", "content": "hi"}], GREEDY)
