"""The committed demo model meets its targets, and the build is reproducible."""
import hashlib

import pytest
from safetensors.torch import load_file

from chatapp.core import config
from chatapp.demo import demo_model, evaluation, shapes
from chatapp.serving.engine import Engine


@pytest.fixture(scope="module")
def greedy_eval():
    return evaluation.evaluate(config.DEMO_MODEL_DIR, per_type=40, seed=3, progress=False)


@pytest.mark.slow
def test_greedy_accuracy_on_held_out_images(greedy_eval):
    for qtype, r in greedy_eval["per_type"].items():
        assert r["accuracy"] >= 0.925, (qtype, r, greedy_eval["failures"][:5])
    assert set(greedy_eval["per_type"]) == set(shapes.QUESTION_TYPES)


@pytest.mark.slow
def test_sampling_at_temperature_one_mixes_the_three_styles():
    result = evaluation.evaluate(config.DEMO_MODEL_DIR, per_type=40, seed=4, temperature=1.0, progress=False)
    for style, share in result["style_share"].items():
        assert 0.2 <= share <= 0.47, result["style_share"]


def test_committed_model_is_small_and_safetensors_only():
    files = {p.name: p.stat().st_size for p in config.DEMO_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    assert sum(files.values()) < 10 * 1024 * 1024


def _weights_digest(folder) -> str:
    tensors = load_file(folder / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_build_is_reproducible_and_loads_through_the_auto_classes(tmp_path):
    cfg = demo_model.BuildConfig(seed=5, vision_images=16, vision_steps=3, vision_batch_size=8, train_images=30,
                                 questions_per_image=2, max_steps=3, batch_size=8)
    first, second = tmp_path / "a", tmp_path / "b"
    demo_model.build(first, cfg, log=lambda m: None)
    demo_model.build(second, cfg, log=lambda m: None)
    assert _weights_digest(first) == _weights_digest(second)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    engine = Engine.load(str(first))
    reply = engine.generate([{"role": "user", "content": "hello"}], config.validate_generation(
        temperature=0, max_new_tokens=5))
    assert reply.meta.reply_tokens >= 1
