"""The chat page's generation settings: one widget per generation input declared in config, and the
way back from the widgets' values to validated `GenerationParams`.

Invariants:
- Widgets are derived from config's `GenerationParam` specs, the sampling ones in
  `config.WEB_SAMPLING_PARAMS` order; the page's handlers take the sampling values in that order.
- A widget's element id is its input's name with dashes (`top_k` -> #top-k): browser tests find it so.
- Never imports torch.
"""
from __future__ import annotations

import gradio as gr

from chatapp.core import config


def widget(param: config.GenerationParam):
    """A slider for a number with a default, a one-line box for an optional number (empty = unset),
    radio buttons for a choice, a text box for text."""
    elem_id = param.name.replace("_", "-")
    if param.choices:
        return gr.Radio(list(param.choices), value=param.default, label=f"{param.label} ({param.note})",
                        elem_id=elem_id)
    if param.kind is str:
        return gr.Textbox(label=param.label, value=param.default, max_length=param.high, elem_id=elem_id)
    if param.optional:
        return gr.Textbox(label=f"{param.label} ({param.note}; {param.low} to {param.high})", value="",
                          elem_id=elem_id, max_lines=1)
    high = param.high if param.slider_high is None else param.slider_high
    return gr.Slider(param.low, high, value=param.default, step=param.step, elem_id=elem_id,
                     label=f"{param.label} ({param.note})" if param.note else param.label)


def build_panel() -> tuple[list, gr.Textbox]:
    """The closed "Generation settings" accordion, in the layout being built: (the sampling widgets,
    the system prompt box)."""
    with gr.Accordion("Generation settings", open=False):
        sampling = [widget(param) for param in config.WEB_SAMPLING_PARAMS]
        system_prompt = widget(config.SYSTEM_PROMPT)
    return sampling, system_prompt


def validated(*values) -> config.GenerationParams:
    """The sampling widgets' values, in their order, as GenerationParams; ParameterError names a bad one."""
    names = [param.name for param in config.WEB_SAMPLING_PARAMS]
    return config.validate_generation(**dict(zip(names, values, strict=True)))
