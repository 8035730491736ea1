"""The openai backend's wire format without a server: request bodies per engine and error sentences
(tests/test_openai_backend.py runs them against a real one)."""
from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image

from chatapp.core import config
from chatapp.demo import shapes
from chatapp.serving.openai_backend import parse_path_map
from chatapp.serving.openai_wire import (ServerSaid, chunk_delta, parse_event, request_body, status_message,
                                         transport_message)
from chatapp.core.config import ParameterError


def conversation():
    image = shapes.render(shapes.random_scene(random.Random(3)))
    return image, [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]


def test_images_go_as_lossless_data_urls_with_their_detail():
    image, messages = conversation()
    body = request_body("vllm", "m", messages, config.validate_generation(), seed=5, detail="low")
    part = body["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["detail"] == "low"
    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    assert list(Image.open(io.BytesIO(data)).convert("RGB").getdata()) == list(image.convert("RGB").getdata())
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["seed"] == 5


def test_sampling_maps_to_what_each_engine_reads():
    _, messages = conversation()
    sampled = config.validate_generation(temperature=0.8, top_k=0, top_p=0.9, repetition_penalty=1.2,
                                         max_new_tokens=33)
    vllm = request_body("vllm", "m", messages, sampled, seed=1)
    assert (vllm["temperature"], vllm["top_p"], vllm["top_k"], vllm["repetition_penalty"], vllm["max_tokens"]) == \
        (0.8, 0.9, -1, 1.2, 33)
    hf = request_body("transformers", "m", messages, sampled, seed=1, detail="low")
    assert json.loads(hf["generation_config"]) == config.sampling_kwargs(sampled)  # as the in-process engine
    assert "temperature" not in hf and "top_k" not in hf  # its schema refuses unknown fields
    assert hf["chat_template_kwargs"] == {"processor_kwargs": {"do_image_splitting": False}}
    generic = request_body("generic", "m", messages, config.validate_generation(temperature=0), seed=1)
    assert generic["temperature"] == 0 and "top_k" not in generic and "top_p" not in generic


def test_stream_events_and_server_errors():
    assert parse_event("") is None and parse_event("data: [DONE]") is None and parse_event(": ping") is None
    chunk = parse_event('data: {"choices": [{"delta": {"content": " A"}, "finish_reason": null}]}')
    assert chunk_delta(chunk) == (" A", None)
    with pytest.raises(ServerSaid, match="out of memory"):
        parse_event('data: {"error": "CUDA out of memory"}')
    missing = status_message("http://h/v1", 404, b'{"error": {"message": "The model `v9` does not exist."}}', "v9")
    assert "does not serve model 'v9'" in missing and "--backend-model" in missing
    assert "API key" in status_message("http://h/v1", 401, b"{}", "m")
    assert "failed (HTTP 500" in status_message("http://h/v1", 500, b"Internal Server Error", "m")

    class ConnectError(Exception):
        pass

    class RemoteProtocolError(Exception):
        pass

    assert "not reachable" in transport_message("http://h/v1", ConnectError("refused"), streaming=False, timeout_s=5)
    assert "what was shown is kept" in transport_message("http://h/v1", RemoteProtocolError("peer closed"),
                                                         streaming=True, timeout_s=5)


def test_path_map_rewrites_the_longest_prefix(tmp_path):
    pairs = parse_path_map([f"{tmp_path}=/srv", f"{tmp_path / 'data'}=/data"])
    assert pairs[0][1] == "/data"
    with pytest.raises(ParameterError, match="LOCAL=REMOTE"):
        parse_path_map(["no-equals-sign"])
