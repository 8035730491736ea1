"""Generation inputs are declared once (config's GenerationParam specs): the dataclass, the `ask` flags,
the API's parameter lists and the page's widgets all follow them, and the published API contract
(names, order, defaults) holds."""
import dataclasses

import gradio as gr

from chatapp.cli import build_parser
from chatapp.core import config
from chatapp.feedback.store import Store
from chatapp.web import generation_settings
from chatapp.web.api import register
from chatapp.web.chat import ChatService
from chatapp.web.ui import ChatPage
from chatapp.web.users import Users


def test_generation_params_follow_the_specs():
    fields = dataclasses.fields(config.GenerationParams)
    assert [f.name for f in fields] == [param.name for param in config.SAMPLING_PARAMS]
    assert [f.default for f in fields] == [param.default for param in config.SAMPLING_PARAMS]
    assert config.validate_generation() == config.GenerationParams()
    for param in config.SAMPLING_PARAMS:
        if param.choices:  # a choice has no bounds: its default is one of the choices
            assert param.default in param.choices
            continue
        assert param.low <= param.high and (param.optional or param.low <= param.default <= param.high)


def test_ask_has_one_flag_per_input_with_its_default():
    args = build_parser().parse_args(["ask", "hello"])
    for param in config.SAMPLING_PARAMS + (config.SYSTEM_PROMPT,):
        assert getattr(args, param.name) == param.default
    args = build_parser().parse_args(["ask", "--top-k", "5", "--repetition-penalty", "1.5", "--seed", "3",
                                      "--system", "be brief", "hello"])
    assert (args.top_k, args.repetition_penalty, args.seed, args.system_prompt) == (5, 1.5, 3, "be brief")


def _parameters(info, endpoint):
    return [(p["parameter_name"], p.get("parameter_default")) for p in info["named_endpoints"][endpoint]["parameters"]]


def test_the_api_parameter_lists_keep_their_published_names_order_and_defaults(demo_engine, tmp_path):
    with gr.Blocks() as app:
        register(ChatService(demo_engine, Store(tmp_path / "data")), Users(tmp_path / "data"))
    info = app.get_api_info()
    sampling = [("temperature", 0.7), ("top_k", 50), ("top_p", 1.0), ("max_new_tokens", 256), ("seed", None),
                ("image_detail", "auto")]
    chat = [("conversation_id", ""), ("text", ""), ("image", None), *sampling, ("system_prompt", "")]
    assert _parameters(info, "/chat") == chat
    assert _parameters(info, "/regenerate") == [("message_id", None), *sampling]
    assert _parameters(info, "/compare") == [(name, 1.0 if name == "temperature" else default)
                                             for name, default in chat]
    assert "continue a conversation" in info["named_endpoints"]["/chat"]["description"]
    assert "Args" not in info["named_endpoints"]["/chat"]["description"]


def test_the_page_settings_start_at_the_defaults_and_validate_back(demo_engine, tmp_path):
    page = ChatPage(ChatService(demo_engine, Store(tmp_path / "data")), Users(tmp_path / "data"))
    app = page.build("demo")
    widgets = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    values = []
    for param in config.WEB_SAMPLING_PARAMS:
        widget = widgets[param.name.replace("_", "-")]
        if isinstance(widget, gr.Slider):
            assert widget.minimum == param.low and widget.maximum <= param.high
        values.append(widget.value)
    assert generation_settings.validated(*values) == config.validate_generation()
    assert widgets["system-prompt"].max_length == config.SYSTEM_PROMPT.high
