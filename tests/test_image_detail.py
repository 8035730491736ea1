"""Image detail (issue 13 item 2): low = one frame at the vision encoder's size, high = the
processor's full splitting, auto = resolved by the engine (the server's --image-detail, else low on a
CPU, high on a GPU). The resolved value is stored in the generation record, shown in the reply's
footer, keys the serving cache, and is what training rebuilds prompts with.

The demo model's own processor never splits (one 64 px frame), so low and high would be the same
there: these tests give the demo model a processor that splits (4x4 frames of 64 px plus a global
one), and count SmolVLM-sized tokens on a processor with SmolVLM-256M's settings without running the
big model."""
import random

import pytest

from chatapp.cli import main as cli_main
from chatapp.core import config
from chatapp.core.config import ParameterError, validate_generation
from chatapp.demo import shapes
from chatapp.demo.architecture import build_processor
from chatapp.feedback.store import Store
from chatapp.learning import modelops
from chatapp.learning.data import image_detail_of, prepare_data
from chatapp.learning.settings import TrainSettings
from chatapp.serving.engine import Engine
from chatapp.serving.messages import image_detail_kwargs
from chatapp.web.answering import reply_footer
from chatapp.web.chat import ChatService
from chatapp.web.users import LOCAL

QUESTION = "What color is the circle?"


def splitting_processor(image_size: int, image_seq_len: int):
    """A processor of the demo family that splits images like SmolVLM's (4x4 frames plus a global one)."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(config.DEMO_MODEL_DIR).tokenizer
    return build_processor(tokenizer, image_size=image_size, image_seq_len=image_seq_len, do_image_splitting=True)


@pytest.fixture(scope="module")
def engine():
    engine = Engine.load("demo")
    engine.processor = splitting_processor(64, 16)  # the demo vision tower's 64 px frames, 16 tokens each
    return engine


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    shapes.render(shapes.random_scene(random.Random(3))).save(path)
    return path


def prompt_inputs(processor, image, detail: str):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[[image]], return_tensors="pt", **image_detail_kwargs(processor, detail))


def image_tokens(processor, inputs) -> int:
    return int((inputs["input_ids"] == processor.image_token_id).sum())


def test_smolvlm_sized_processor_sees_one_64_token_frame_at_low_and_17_frames_at_high():
    processor = splitting_processor(512, 64)  # SmolVLM-256M-Instruct's image settings
    image = shapes.render(shapes.random_scene(random.Random(0)))
    low, high = prompt_inputs(processor, image, "low"), prompt_inputs(processor, image, "high")
    assert tuple(low["pixel_values"].shape[1:]) == (1, 3, 512, 512) and image_tokens(processor, low) == 64
    assert tuple(high["pixel_values"].shape[1:]) == (17, 3, 512, 512) and image_tokens(processor, high) == 17 * 64
    assert high["input_ids"].shape[1] - low["input_ids"].shape[1] > 1000


def test_the_demo_models_own_processor_sees_the_same_at_both_details(demo_engine):
    image = shapes.render(shapes.random_scene(random.Random(0)))
    low, high = (prompt_inputs(demo_engine.processor, image, d) for d in ("low", "high"))
    assert low["input_ids"].tolist() == high["input_ids"].tolist() and image_tokens(demo_engine.processor, low) == 16


def test_auto_is_resolved_by_the_server_default_then_the_device(engine):
    assert engine.model.device.type == "cpu"
    assert engine.resolved(validate_generation()).image_detail == "low"
    assert engine.resolved(validate_generation(image_detail="high")).image_detail == "high"
    engine.image_detail = "high"  # serve --image-detail high
    try:
        assert engine.resolved(validate_generation()).image_detail == "high"
        assert engine.resolved(validate_generation(image_detail="low")).image_detail == "low"
    finally:
        engine.image_detail = "auto"


def test_bad_values_are_refused_with_the_choices_named(engine, capsys):
    for bad in ("medium", "", None, 1, ["low"]):
        with pytest.raises(ParameterError, match=r"image_detail must be one of low, high, auto, got"):
            validate_generation(image_detail=bad)
    with pytest.raises(ParameterError, match="image_detail must be one of"):  # unvalidated params reach the engine
        engine.resolved(config.GenerationParams(image_detail="HIGH"))
    assert cli_main(["ask", "--image-detail", "medium", "hi"]) == 2  # refused before any model is loaded
    assert "image_detail must be one of low, high, auto, got 'medium'" in capsys.readouterr().err


def answer(service, image_file, detail: str, **sampling):
    params = validate_generation(**{"temperature": 0, "max_new_tokens": 8, "image_detail": detail, **sampling})
    return list(service.chat(LOCAL, "", QUESTION, [str(image_file)], params))[-1]


def test_the_record_stores_the_detail_used_and_the_footer_shows_it(engine, image_file, tmp_path):
    store = Store(tmp_path / "data")
    service = ChatService(engine, store)
    low, high = answer(service, image_file, "auto"), answer(service, image_file, "high")
    low_record, high_record = store.generation(low.message_id), store.generation(high.message_id)
    assert low_record["params"]["image_detail"] == "low" and high_record["params"]["image_detail"] == "high"
    # 16 image tokens at low; 17 frames of 16 plus their row/column markers at high
    assert high_record["prompt_tokens"] - low_record["prompt_tokens"] > 16 * 16
    assert "image detail low" in reply_footer(low) and "image detail high" in reply_footer(high)
    text_only = list(service.chat(LOCAL, "", "Hello", [], validate_generation(temperature=0, max_new_tokens=4)))[-1]
    assert "image detail" not in reply_footer(text_only)  # nothing was seen at any detail
    assert store.generation(text_only.message_id)["params"]["image_detail"] == "low"


def test_training_rebuilds_each_prompt_at_the_detail_it_was_generated_at(engine, image_file, tmp_path):
    store = Store(tmp_path / "data")
    service = ChatService(engine, store)
    # seeded samples with distinct texts that the model ended itself (the demo model was trained on one
    # frame: at high it rambles, so that answer gets the thumbs down, which a cut-off answer may take)
    sampled = dict(temperature=1.0, max_new_tokens=64)
    low_ids = [answer(service, image_file, "low", seed=seed, **sampled).message_id for seed in (0, 1, 3)]
    high_id = answer(service, image_file, "high", seed=3, **sampled).message_id
    user_id = service.user_id(LOCAL)
    for message_id, vote in zip(low_ids + [high_id], ("up", "down", "up", "down")):
        store.set_vote(user_id, message_id, vote, [], "")
    data = prepare_data(store, TrainSettings(held_out_fraction=0.0, min_rows=1))
    assert data.image_detail == "low"  # most image answers were asked at low
    trained = {row["completion"][0]["content"][0]["text"] for row in data.kto_train.rows}
    assert len(data.kto_train) == 3 and any("another image detail" in r for r in data.kto_train.skipped)
    assert trained == {store.message(i)["text"] for i in low_ids}

    # the run's processor (a fresh one, as the trainer loads it) rebuilds exactly the engine's prompt
    run_processor = splitting_processor(64, 16)
    modelops.use_image_detail(run_processor, data.image_detail)
    row = data.kto_train.rows[0]
    images = modelops.load_images(row["images"])
    rebuilt = run_processor(text=[run_processor.apply_chat_template(row["prompt"], add_generation_prompt=True)],
                            images=[images], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": QUESTION}]}]
    served, _, _ = engine.prepare(messages, validate_generation(image_detail="low"))
    assert rebuilt["input_ids"].tolist() == served["input_ids"].tolist()
    assert rebuilt["pixel_values"].shape == served["pixel_values"].shape

    # a record from before the setting was made at the processor's full splitting
    params = dict(store.generation(high_id)["params"])
    del params["image_detail"]
    store.update_answer(high_id, store.message(high_id)["text"], {**store.generation(high_id), "params": params})
    assert image_detail_of(store, high_id) == "high"


def test_the_serving_cache_keeps_a_low_and_a_high_encoding_of_one_image_apart(engine, image_file, tmp_path):
    from chatapp.serving.cache import ServingCache

    service = ChatService(engine, Store(tmp_path / "data"))
    engine.cache = ServingCache(config.SERVING_CACHE_BYTES)
    try:
        first_low = answer(service, image_file, "low")
        high = answer(service, image_file, "high")
        # the high prompt encoded its own features (low's 1-frame ones would not even fit its 17 frames)
        assert engine.cache.stats["image_misses"] == 2 and engine.cache.stats["image_hits"] == 0
        again_low = answer(service, image_file, "low")  # all of it from the cache: nothing encoded again
        assert engine.cache.stats["image_misses"] == 2 and engine.cache.stats["prefix_hits"] >= 1
        assert again_low.text == first_low.text
        engine.cache = None  # the plain path gives the same greedy replies at each detail
        assert answer(service, image_file, "high").text == high.text
        assert answer(service, image_file, "low").text == first_low.text
    finally:
        engine.cache = ServingCache(config.SERVING_CACHE_BYTES)
