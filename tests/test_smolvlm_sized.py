"""Loading a real SmolVLM-256M-style checkpoint: a random-weight Idefics3 model with the real
model's dimensions and processor settings (512 px frames, image splitting), built locally and
saved like a hub checkpoint, loads and streams through the same path as any model."""
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
                            validate_generation(temperature=0, max_new_tokens=3),
                            generate_overrides={"min_new_tokens": 3})
    # 16 tiles of 512 px plus the global image, 64 tokens each: the real processor's expansion.
    assert reply.meta.prompt_tokens > 17 * 64
    assert reply.meta.reply_tokens == 3 and reply.meta.finish_reason == "length"
