"""The chat page (Gradio Blocks).

Invariants:
- Never imports torch; talks to the model only through an `Engine` it is given.
- Handlers are plain functions of their inputs (see `ChatHandlers`), testable without a server.
- Every handler validates its own inputs: it is also reachable through Gradio's HTTP API.
"""
from __future__ import annotations

from typing import Iterator

import gradio as gr

from . import config
from .config import ParameterError
from .engine import Engine, EngineError
from .images import ImageError, load_image

TITLE = "chatapp"


def _file_path(part) -> str | None:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        if isinstance(part.get("file"), dict):
            return part["file"].get("path")
        return part.get("path")
    return getattr(part, "path", None)


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio chat history (messages format) -> engine messages. Consecutive user entries (an
    image, then its text) become one user turn, images first, as the user sent them."""
    messages: list[dict] = []
    for entry in history or []:
        role = entry.get("role")
        content = entry.get("content")
        parts = content if isinstance(content, list) else [content]
        converted = []
        for part in parts:
            if isinstance(part, str):
                converted.append({"type": "text", "text": part})
            elif isinstance(part, dict) and part.get("type") == "text":
                converted.append({"type": "text", "text": part.get("text") or ""})
            elif (path := _file_path(part)) is not None:
                if role == "user":
                    converted.append({"type": "image", "image": load_image(path)})
            # other components (e.g. rendered widgets) carry nothing for the model
        converted = [p for p in converted if p["type"] != "text" or p["text"].strip()]
        if not converted or role not in ("user", "assistant"):
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(converted)
        else:
            messages.append({"role": role, "content": converted})
    return messages


class ChatHandlers:
    def __init__(self, engine: Engine):
        self.engine = engine

    def add_user_message(self, message: dict | None, history: list | None):
        """Put the user's text and images into the chat; refuse bad input before it is shown."""
        message = message or {}
        text = (message.get("text") or "").strip()
        files = message.get("files") or []
        if not text and not files:
            raise gr.Error("Type a message or attach an image.")
        if len(text) > config.MAX_MESSAGE_CHARS:
            raise gr.Error(f"The message is {len(text)} characters long; the limit is {config.MAX_MESSAGE_CHARS}.")
        if len(files) > config.MAX_IMAGES_PER_MESSAGE:
            raise gr.Error(f"At most {config.MAX_IMAGES_PER_MESSAGE} images per message.")
        history = list(history or [])
        for f in files:
            path = _file_path(f)
            try:
                load_image(path)
            except ImageError as error:
                raise gr.Error(str(error)) from None
            history.append({"role": "user", "content": {"path": path}})
        if text:
            history.append({"role": "user", "content": text})
        return history, gr.MultimodalTextbox(value=None, interactive=False)

    def respond(self, history: list | None, temperature: float, top_k: int, system_prompt: str = "",
                ) -> Iterator[tuple[list, str]]:
        """Stream the assistant's answer to the conversation in `history`."""
        history = list(history or [])
        try:
            params = config.validate_generation(temperature=temperature, top_k=top_k)
            messages = history_to_messages(history)
            if not messages or messages[-1]["role"] != "user":
                raise gr.Error("There is no user message to answer.")
            history.append({"role": "assistant", "content": ""})
            for event in self.engine.stream(messages, params, system_prompt=system_prompt or None):
                if not event.delta and not event.done:
                    continue
                history[-1] = {"role": "assistant", "content": event.text}
                info = ""
                if event.done:
                    meta = event.meta
                    speed = f" · {meta.tokens_per_s:.0f} tokens/s" if meta.tokens_per_s else ""
                    trimmed = f" · {meta.trimmed_messages} oldest messages left out to fit" if meta.trimmed_messages else ""
                    info = (f"model `{meta.model_id}` · adapter `{meta.adapter or 'none'}` · "
                            f"{meta.reply_tokens} tokens{speed}{trimmed}")
                yield history, info
        except (ParameterError, ImageError, EngineError) as error:
            raise gr.Error(str(error)) from None


def build_app(engine: Engine, notice: str | None = None) -> gr.Blocks:
    handlers = ChatHandlers(engine)
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE}\nChat with `{engine.model_id}`: attach an image and ask about it.")
        if notice:
            gr.Markdown(f"**Notice:** {notice}", elem_id="model-notice")
        chatbot = gr.Chatbot(elem_id="chatbot", height=480, label="Chat")
        textbox = gr.MultimodalTextbox(elem_id="message", file_types=["image"], file_count="multiple",
                                       placeholder="Ask about an image…", show_label=False, sources=["upload"])
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop", variant="stop")
            clear = gr.Button("New chat", elem_id="new-chat")
        info = gr.Markdown(elem_id="reply-info")
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(config.TEMPERATURE_MIN, config.TEMPERATURE_MAX, value=config.DEFAULT_TEMPERATURE,
                                    step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
            top_k = gr.Slider(config.TOP_K_MIN, 200, value=config.DEFAULT_TOP_K, step=1,
                              label="Top-k (0 = off)", elem_id="top-k")
            system_prompt = gr.Textbox(label="System prompt", value=config.DEFAULT_SYSTEM_PROMPT,
                                       max_length=config.MAX_SYSTEM_PROMPT_CHARS, elem_id="system-prompt")

        submitted = textbox.submit(handlers.add_user_message, [textbox, chatbot], [chatbot, textbox],
                                   api_visibility="private")
        answering = submitted.then(handlers.respond, [chatbot, temperature, top_k, system_prompt],
                                   [chatbot, info], api_visibility="private")
        answering.then(lambda: gr.MultimodalTextbox(interactive=True), None, [textbox], api_visibility="private")
        submitted.failure(lambda: gr.MultimodalTextbox(interactive=True), None, [textbox], api_visibility="private")
        answering.failure(lambda: gr.MultimodalTextbox(interactive=True), None, [textbox], api_visibility="private")
        stop.click(lambda: gr.MultimodalTextbox(interactive=True), None, [textbox], cancels=[answering],
                   api_visibility="private")
        clear.click(lambda: ([], "", gr.MultimodalTextbox(value=None, interactive=True)), None,
                    [chatbot, info, textbox], cancels=[answering], api_visibility="private")
    return app
