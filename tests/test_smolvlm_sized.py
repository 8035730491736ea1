"""Loading a real SmolVLM-256M-style checkpoint: a random-weight Idefics3 model with the real
model's dimensions and processor settings (512 px frames, image splitting), built locally and
saved like a hub checkpoint, loads and streams through the same path as any model."""
import os
import random

import pytest

from chatapp.demo import shapes
from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random
from chatapp.core.config import validate_generation
from chatapp.serving.engine import Engine

pytestmark = pytest.mark.slow  # a SmolVLM-sized model built and run on the CPU


@pytest.fixture(scope="module")
def smolvlm_path(tmp_path_factory):
    return build_smolvlm_sized_random(tmp_path_factory.mktemp("models") / "smolvlm-256m-random")


def test_smolvlm_sized_checkpoint_loads_and_answers_about_an_image(smolvlm_path):
    engine = Engine.load(str(smolvlm_path))
    config = engine.model.config
    assert type(engine.model).__name__ == "Idefics3ForConditionalGeneration"
    assert config.text_config.hidden_size == 576 and config.text_config.num_hidden_layers == 30
    assert config.vision_config.image_size == 512 and config.scale_factor == 4
    assert 200e6 < sum(p.numel() for p in engine.model.parameters()) < 300e6
    assert engine.max_context_tokens == 8192
    image = shapes.render(shapes.random_scene(random.Random(0)))
    reply = engine.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": "Describe the image."}]}],
                            validate_generation(temperature=0, max_new_tokens=3, image_detail="high"),
                            generate_overrides={"min_new_tokens": 3})
    # 16 tiles of 512 px plus the global image, 64 tokens each: the real processor's expansion.
    assert reply.meta.prompt_tokens > 17 * 64
    assert reply.meta.reply_tokens == 3 and reply.meta.finish_reason == "length"


def test_smolvlm_sized_tokenizer_covers_the_whole_vocabulary(smolvlm_path):
    from transformers import AutoProcessor

    from chatapp.demo.architecture import SPECIAL_TOKENS
    from chatapp.demo.smolvlm_sized import SMOLVLM_256M_DIMS

    tokenizer = AutoProcessor.from_pretrained(smolvlm_path).tokenizer
    assert len(tokenizer) == SMOLVLM_256M_DIMS["vocab_size"] == 49280  # the real head size
    special = set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))  # the template's own tokens
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer)) if i not in special], skip_special_tokens=True)
    assert all(texts)  # every id but the special ones decodes to text (a few bytes to whitespace)
    placeholders = texts[-40_000:]
    assert all(text.startswith(" ") and text[1:].isalpha() for text in placeholders)
    assert len(set(placeholders)) == len(placeholders)  # distinct words
    question = "How many red circles are there?"  # the shapes-world words still encode as before
    assert tokenizer.decode(tokenizer(question)["input_ids"]) == question


def test_smolvlm_sized_model_holds_a_multi_turn_conversation(smolvlm_path):
    engine = Engine.load(str(smolvlm_path))
    params = validate_generation(temperature=0, max_new_tokens=6)
    conversation = []
    for question in ["Hello there.", "Tell me more.", "And then?"]:
        conversation.append({"role": "user", "content": [{"type": "text", "text": question}]})
        reply = engine.generate(conversation, params, generate_overrides={"min_new_tokens": 6})
        assert reply.text.strip(), f"turn {len(conversation)} decoded to no text"
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": reply.text}]})
    assert reply.meta.prompt_tokens > 20  # the third turn's prompt holds the first two exchanges


@pytest.mark.proof
@pytest.mark.skipif(os.environ.get("CHATAPP_PROOF") != "1",
                    reason="opt-in (CHATAPP_PROOF=1): two 17-frame first turns take minutes on 2 cores; "
                           "the same reuse and identity are checked on the demo model in tests/test_serving_cache.py")
def test_smolvlm_sized_follow_up_reuses_the_conversation_and_answers_the_same(smolvlm_path):
    """The prefix cache on the real-size layout (17 frames of 512 px, image splitting): the follow-up
    reuses the first turn's KV cache, image included, and greedy replies are the same as without it."""
    engine = Engine.load(str(smolvlm_path))
    params = validate_generation(temperature=0, max_new_tokens=8, image_detail="high")
    image = shapes.render(shapes.random_scene(random.Random(0)))
    first = [{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe the image."}]}]
    cached = engine.generate(first, params, generate_overrides={"min_new_tokens": 8})
    follow_up = first + [{"role": "assistant", "content": [{"type": "text", "text": cached.text}]},
                         {"role": "user", "content": [{"type": "text", "text": "Tell me more."}]}]
    cached_follow_up = engine.generate(follow_up, params, generate_overrides={"min_new_tokens": 8})
    assert engine.cache.stats["prefix_hits"] == 1 and engine.cache.stats["reused_tokens"] > 17 * 64
    engine.cache = None  # the plain path: every turn encodes the whole conversation
    plain = engine.generate(first, params, generate_overrides={"min_new_tokens": 8})
    plain_follow_up = engine.generate(follow_up, params, generate_overrides={"min_new_tokens": 8})
    assert (cached.text, cached_follow_up.text) == (plain.text, plain_follow_up.text)
    assert cached_follow_up.text and cached_follow_up.meta.reply_tokens == plain_follow_up.meta.reply_tokens == 8


def test_the_vision_encoder_in_bfloat16_hands_float32_features_back_and_leaves_the_rest(smolvlm_path):
    """`--vision-dtype`: the vision encoder's layers in bfloat16, its patch embeddings, the connector and
    the text model in float32 (so `model.dtype` and decoding are as they were); auto picks it on a CPU
    with AMX for this model and never for the demo model."""
    import torch

    from chatapp.core.config import ParameterError
    from chatapp.serving.loading import load_model
    from chatapp.serving.precision import amx_available, vision_dtype_of, vision_tower

    plain = Engine.load(str(smolvlm_path), vision_dtype="float32")
    mixed = Engine.load(str(smolvlm_path), vision_dtype="bfloat16")
    assert (vision_dtype_of(plain.model), vision_dtype_of(mixed.model)) == ("float32", "bfloat16")
    tower = vision_tower(mixed.model)
    assert mixed.model.dtype == torch.float32 and next(tower.embeddings.parameters()).dtype == torch.float32
    assert {p.dtype for p in tower.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in mixed.model.model.text_model.parameters()} == {torch.float32}
    image = shapes.render(shapes.random_scene(random.Random(1)))
    inputs = plain.processor(text=["<image>Describe."], images=[[image]], return_tensors="pt",
                             do_image_splitting=False)
    with torch.inference_mode():
        want = plain.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        got = mixed.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    relative = float((got - want).norm() / want.norm())
    assert 0 < relative < 0.05, relative  # bfloat16 rounding, not another computation
    reply = mixed.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "Describe the image."}]}],
                           validate_generation(temperature=0, max_new_tokens=3, image_detail="low"),
                           generate_overrides={"min_new_tokens": 3})
    assert reply.meta.reply_tokens == 3
    auto = Engine.load(str(smolvlm_path))
    assert vision_dtype_of(auto.model) == ("bfloat16" if amx_available() else "float32")
    assert vision_dtype_of(Engine.load("demo").model) == "float32"
    with pytest.raises(ParameterError, match="vision dtype"):
        load_model("demo", vision_dtype="int8")


def test_prompts_prefilled_together_with_different_frame_counts_each_get_their_reply_alone(smolvlm_path):
    # where several prompts are prefilled in one pass (an accelerator), a 1-frame prompt (detail=low)
    # is padded with all-zero frames beside a 17-frame one (high): the model drops them, and each reply
    # is the one its prompt gets alone (the encoder in float32 here: the comparison is of arithmetic,
    # and a random model's near-even logits would turn bfloat16 rounding into other tokens)
    from test_batching import concurrently

    engine = Engine.load(str(smolvlm_path), vision_dtype="float32")
    engine.batcher.prefill_rows = 3
    jobs = []
    for seed, detail in ((40, "low"), (41, "high"), (42, "low")):
        image = shapes.render(shapes.random_scene(random.Random(seed)))
        jobs.append(([{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "Describe the image." + " Briefly." * (seed - 40)}]}],
                     validate_generation(temperature=0, max_new_tokens=4, image_detail=detail),
                     {"generate_overrides": {"min_new_tokens": 4}}))
    together = concurrently(engine, jobs, queued_together=True)
    assert engine.batcher.largest_prefill == 3
    engine.cache, engine.batching = None, False
    expected = [engine.generate(*job[:2], **job[2]) for job in jobs]
    assert [r.meta.prompt_tokens for r in together] == [r.meta.prompt_tokens for r in expected]
    assert together[1].meta.prompt_tokens > 17 * 64 > together[0].meta.prompt_tokens
    assert [r.text for r in together] == [r.text for r in expected]
