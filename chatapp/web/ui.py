"""The chat page (Gradio Blocks): chat with images, thumbs with reasons, regenerate and sibling
navigation, preferring an answer, edit, compare mode, the sidebar of past conversations.

Invariants:
- Never imports torch; every action goes through `ChatService` (which validates and authorizes),
  so the page can do nothing the API could not.
- The generation settings widgets come from config's specs (`generation_settings`); the
  handlers take their values in `config.WEB_SAMPLING_PARAMS` order.
- Handlers are methods of `ChatPage`, plain functions of their inputs plus the caller's request,
  testable without a server. Page events are private; the API lives in `api.py`.
- The chat shown is always rebuilt from the store after an action; `PageState` only remembers which
  conversation is open, which message each chat entry shows, and what the thumbs/compare panels act on.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field, replace

import gradio as gr

from chatapp.core import config
from chatapp.web import generation_settings
from chatapp.web.access import editable_prefix, image_html
from chatapp.web.answering import reply_footer
from chatapp.web.api import as_gradio_errors, caller, file_path, register
from chatapp.web.chat import ChatService
from chatapp.core.errors import RequestError
from chatapp.web.users import Users

TITLE = "chatapp"
LIKE, DISLIKE = "Like", "Dislike"


@dataclass
class PageState:
    conversation_id: int | None = None
    entry_ids: list = field(default_factory=list)  # message id of each chat entry (images are entries too)
    selected_id: int | None = None  # the answer that sibling navigation / prefer act on
    feedback_id: int | None = None  # the answer the reasons/comment panel applies to
    comparison_id: int | None = None


def _footer(message: dict) -> str:
    bits = []
    if len(message["siblings"]) > 1:
        bits.append(f"answer {message['position']} of {len(message['siblings'])}")
    if message.get("preferred"):
        bits.append("★ preferred")
    ending = {"stopped": "stopped", "cut_off": "cut off"}.get(message.get("finish_reason"))  # cut off: by a crash
    bits += [bit for bit in (ending, "" if message["text"] else "no text") if bit]
    bits.append(f"{message.get('model')} · adapter {message.get('adapter') or 'none'}")
    return f"\n\n<sub>{html.escape(' · '.join(bits))}</sub>"


def render(conversation: dict | None) -> tuple[list, list, list, int | None]:
    """Conversation (from ChatService.conversation) -> chat entries, their message ids, thumbs states,
    and the last answer's id."""
    entries, ids, feedback, last_answer = [], [], [], None
    for message in (conversation or {}).get("messages", []):
        if message["role"] == "user":
            for index, _ in enumerate(message["images"]):  # served by access.py's route, never as a file
                entries.append({"role": "user", "content": image_html(message["id"], index)})
                ids.append(message["id"])
            if message["text"]:
                entries.append({"role": "user", "content": message["text"]})
                ids.append(message["id"])
        else:
            entries.append({"role": "assistant", "content": message["text"] + _footer(message)})
            ids.append(message["id"])
            vote = (message.get("vote") or {}).get("vote")
            feedback.append({"up": LIKE, "down": DISLIKE}.get(vote))
            last_answer = message["id"]
    return entries, ids, feedback, last_answer


def _sibling_label(conversation: dict | None, selected_id: int | None) -> str:
    for message in (conversation or {}).get("messages", []):
        if message["id"] == selected_id and len(message["siblings"]) > 1:
            star = " ★ preferred" if message.get("preferred") else ""
            return f"Answer {message['position']} of {len(message['siblings'])}{star}"
    return ""


def _message_parts(message: dict | None) -> tuple[str, list[str]]:
    message = message or {}
    files = [file_path(f) for f in message.get("files") or []]
    return message.get("text") or "", [f for f in files if f]


class ChatPage:
    def __init__(self, service: ChatService, users: Users):
        self.service = service
        self.users = users

    # ------------------------------------------------------------ helpers

    def _show(self, user, state: PageState, conversation_id: int | None, selected_id: int | None = None):
        """Rebuild the chat from the store; returns (chatbot update, new state, sibling label)."""
        if conversation_id is None:
            return gr.Chatbot(value=[], feedback_value=[]), PageState(), ""
        conversation = self.service.conversation(user, conversation_id)
        entries, ids, feedback, last_answer = render(conversation)
        shown = {m["id"] for m in conversation["messages"]}
        selected = selected_id if selected_id in shown else last_answer
        new_state = replace(state, conversation_id=conversation["id"], entry_ids=ids, selected_id=selected)
        return (gr.Chatbot(value=entries, feedback_value=feedback), new_state,
                _sibling_label(conversation, selected))

    def _conversation_choices(self, user, selected: int | None = None):
        choices = [(c["title"] or f"Chat {c['id']}", c["id"]) for c in self.service.conversations(user)]
        return gr.Radio(choices=choices, value=selected)

    def _entry_message_id(self, state: PageState, index) -> int:
        if isinstance(index, (list, tuple)):
            index = index[0]
        try:
            return state.entry_ids[int(index)]
        except (IndexError, TypeError, ValueError):
            raise RequestError("that message is no longer shown; reopen the conversation") from None

    # ------------------------------------------------------------ page load, sidebar

    @as_gradio_errors
    def load(self, request: gr.Request):
        user = caller(self.users, request)
        who = f"Signed in as **{html.escape(user.name)}** ({user.role})"
        if self.users.enabled:
            who += " · [Log out](/logout)"
        return self._conversation_choices(user), who, PageState()

    @as_gradio_errors
    def open_conversation(self, conversation_id, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        if conversation_id in (None, ""):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        chatbot, state, label = self._show(user, state, int(conversation_id))
        system_prompt = self.service.system_prompt(user, state.conversation_id)
        return chatbot, state, label, system_prompt

    def new_chat(self):
        return (gr.Chatbot(value=[], feedback_value=[]), PageState(), "", gr.Radio(value=None), "",
                gr.MultimodalTextbox(value=None, interactive=True), gr.Row(visible=False), gr.Row(visible=False))

    # ------------------------------------------------------------ chatting

    def _stream(self, user, state: PageState, events, pending: list, compare: bool = False):
        """Yield page updates while `events` streams; rebuild from the store at the end."""
        texts = {"a": "", "b": ""}
        conversation_id, last = state.conversation_id, None
        for event in events:
            conversation_id = event.conversation_id
            last = event
            if compare:
                texts[event.side] = event.text
                yield {self.compare_a: texts["a"], self.compare_b: texts["b"],
                       self.state: replace(state, conversation_id=conversation_id)}
            else:
                entries = pending + [{"role": "assistant", "content": event.text}]
                yield {self.chatbot: gr.Chatbot(value=entries),
                       self.state: replace(state, conversation_id=conversation_id)}
        chatbot, new_state, label = self._show(user, state, conversation_id)
        info = ""
        if last is not None and last.done:
            info = reply_footer(last)
            if compare:
                new_state.comparison_id = last.meta.get("comparison_id")
        yield {self.chatbot: chatbot, self.state: new_state, self.sibling_label: label, self.info: info,
               self.conversations: self._conversation_choices(user, new_state.conversation_id),
               self.textbox: gr.MultimodalTextbox(value=None, interactive=True),
               # the panel's end state follows the request that just finished, even if an
               # earlier click (New chat) landed while this one streamed
               self.compare_panel: gr.Row(visible=compare), self.compare_buttons: gr.Row(visible=compare)}

    @as_gradio_errors
    def send(self, message, state: PageState, temperature, top_k, top_p, max_new_tokens, seed, image_detail,
             system_prompt, compare_mode, request: gr.Request):
        user = caller(self.users, request)
        params = generation_settings.validated(temperature, top_k, top_p, max_new_tokens, seed, image_detail)
        text, files = _message_parts(message)
        shown = render(self.service.conversation(user, state.conversation_id))[0] if state.conversation_id else []
        pending = shown + [{"role": "user", "content": {"path": f}} for f in files]
        if text.strip():
            pending.append({"role": "user", "content": text})
        yield {self.textbox: gr.MultimodalTextbox(value=None, interactive=False),
               self.chatbot: gr.Chatbot(value=pending)}
        if compare_mode:
            yield {self.compare_panel: gr.Row(visible=True), self.compare_buttons: gr.Row(visible=False),
                   self.compare_a: "", self.compare_b: ""}
            events = self.service.compare(user, state.conversation_id, text, files, params, system_prompt)
        else:
            events = self.service.chat(user, state.conversation_id, text, files, params, system_prompt)
        yield from self._stream(user, state, events, pending, compare=bool(compare_mode))

    @as_gradio_errors
    def regenerate(self, state: PageState, temperature, top_k, top_p, max_new_tokens, seed, image_detail,
                   request: gr.Request):
        user = caller(self.users, request)
        if state.selected_id is None:
            raise RequestError("there is no answer to regenerate yet")
        params = generation_settings.validated(temperature, top_k, top_p, max_new_tokens, seed, image_detail)
        # regenerate the last answer: a new sibling of it, shown in its place
        conversation = self.service.conversation(user, state.conversation_id)
        answers = [m for m in conversation["messages"] if m["role"] == "assistant"]
        target = answers[-1]["id"]
        entries = render(conversation)[0][:-1]
        yield from self._stream(user, state, self.service.regenerate(user, target, params), entries)

    @as_gradio_errors
    def edit(self, edit: gr.EditData, state: PageState, temperature, top_k, top_p, max_new_tokens, seed,
             image_detail, request: gr.Request):
        user = caller(self.users, request)
        message_id = self._entry_message_id(state, edit.index)
        params = generation_settings.validated(temperature, top_k, top_p, max_new_tokens, seed, image_detail)
        value = edit.value
        text = value if isinstance(value, str) else (value or {}).get("text", "") if isinstance(value, dict) else str(value)
        index = edit.index[0] if isinstance(edit.index, (list, tuple)) else edit.index
        conversation = self.service.conversation(user, state.conversation_id)
        entries = editable_prefix(render(conversation)[0], index) + [{"role": "user", "content": text}]
        yield from self._stream(user, state, self.service.edit(user, message_id, text, params), entries)

    # ------------------------------------------------------------ feedback

    @as_gradio_errors
    def like(self, like: gr.LikeData, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        message_id = self._entry_message_id(state, like.index)
        vote = "none" if like.liked == "" or like.liked is None else ("up" if like.liked is True or like.liked == LIKE
                                                                     else "down")
        self.service.vote(user, message_id, vote)
        new_state = replace(state, feedback_id=message_id if vote != "none" else None)
        title = {"up": "You liked this answer. Why? (optional)", "down": "What was wrong? (optional)"}.get(vote, "")
        return (new_state, gr.Row(visible=vote != "none"), gr.CheckboxGroup(value=[], label=title),
                gr.Textbox(value=""))

    @as_gradio_errors
    def save_feedback(self, reasons, comment, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        if state.feedback_id is None:
            raise RequestError("vote on an answer first")
        current = self.service.current_vote(user, state.feedback_id)
        if current is None:
            raise RequestError("vote on an answer first")
        self.service.vote(user, state.feedback_id, current["vote"], reasons or [], comment or "")
        gr.Info("Thanks, your feedback was saved.")
        return gr.Row(visible=False), replace(state, feedback_id=None)

    @as_gradio_errors
    def select_message(self, select: gr.SelectData, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        message_id = self._entry_message_id(state, select.index)
        message = self.service.message(user, message_id)
        if message is None or message["role"] != "assistant":
            return gr.skip(), gr.skip()
        conversation = self.service.conversation(user, state.conversation_id)
        return replace(state, selected_id=message_id), _sibling_label(conversation, message_id)

    @as_gradio_errors
    def step_sibling(self, step: int, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        if state.selected_id is None:
            raise RequestError("there is no answer to switch yet")
        siblings = self.service.answer_siblings(user, state.selected_id)
        position = siblings.index(state.selected_id) + step
        if not 0 <= position < len(siblings):
            return gr.skip(), gr.skip(), gr.skip()
        target = siblings[position]
        self.service.select(user, target)
        return self._show(user, state, state.conversation_id, selected_id=target)

    def previous_sibling(self, state: PageState, request: gr.Request):
        return self.step_sibling(-1, state, request)

    def next_sibling(self, state: PageState, request: gr.Request):
        return self.step_sibling(1, state, request)

    @as_gradio_errors
    def prefer(self, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        if state.selected_id is None:
            raise RequestError("there is no answer to prefer yet")
        self.service.prefer(user, state.selected_id)
        gr.Info("Marked as the better answer.")
        return self._show(user, state, state.conversation_id, selected_id=state.selected_id)

    @as_gradio_errors
    def pick(self, choice: str, state: PageState, request: gr.Request):
        user = caller(self.users, request)
        if state.comparison_id is None:
            raise RequestError("there is no comparison to decide")
        result = self.service.compare_pick(user, state.comparison_id, choice)
        versions = result["versions"]
        if versions["a"] != versions["b"]:  # an A/B test: say which version each side was
            gr.Info(f"A was {versions['a']}, B was {versions['b']}. Thanks, your pick counts toward the A/B test.")
        chatbot, new_state, label = self._show(user, state, state.conversation_id)
        new_state.comparison_id = None
        return chatbot, new_state, label, gr.Row(visible=False)

    def picker(self, choice: str):
        def pick(state: PageState, request: gr.Request):
            return self.pick(choice, state, request)
        pick.__name__ = f"pick_{choice}"
        return pick

    # ------------------------------------------------------------ layout

    def build(self, model_id: str, notice: str | None = None, admin=None) -> gr.Blocks:
        from chatapp.web import admin_page

        with gr.Blocks(title=TITLE, delete_cache=(config.UPLOAD_CACHE_SWEEP_S, config.UPLOAD_CACHE_MAX_AGE_S)) as app:
            register(self.service, self.users)  # first, so the API gets its names before page events do
            if admin is not None:
                admin_page.register(admin, self.users)
            self.state = gr.State(PageState())
            with gr.Sidebar(elem_id="sidebar"):
                whoami = gr.Markdown(elem_id="whoami")
                new_chat = gr.Button("New chat", elem_id="new-chat", variant="primary")
                self.conversations = gr.Radio(label="Your conversations", choices=[], elem_id="conversations")
            with gr.Tab("Chat", elem_id="chat-tab"):
                gr.Markdown(f"## {TITLE}\nChat with `{model_id}`: attach an image and ask about it. "
                            f"Rate answers with the thumbs, regenerate to get another answer, mark the better one.")
                if notice:
                    gr.Markdown(f"**Notice:** {notice}", elem_id="model-notice")
                self.chatbot = gr.Chatbot(elem_id="chatbot", height=460, label="Chat", editable="user",
                                          group_consecutive_messages=False,  # edit does not fire on a group with an image
                                          feedback_options=(LIKE, DISLIKE))
                with gr.Row(equal_height=True):
                    previous = gr.Button("◀", elem_id="sibling-previous", size="sm", scale=0, min_width=40)
                    self.sibling_label = gr.Markdown(elem_id="sibling-label")
                    following = gr.Button("▶", elem_id="sibling-next", size="sm", scale=0, min_width=40)
                    prefer = gr.Button("Prefer this answer", elem_id="prefer", size="sm", scale=0)
                    regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm", scale=0)
                with gr.Row(visible=False, elem_id="feedback-panel") as feedback_panel:
                    reasons = gr.CheckboxGroup(list(config.FEEDBACK_REASONS), label="Why?", elem_id="reasons", scale=2)
                    comment = gr.Textbox(label="Comment (optional)", max_lines=3, elem_id="comment",
                                         max_length=config.MAX_COMMENT_CHARS, scale=2)
                    save = gr.Button("Send feedback", elem_id="save-feedback", scale=0)
                with gr.Column(visible=False, elem_id="compare-panel") as self.compare_panel:
                    with gr.Row():
                        with gr.Column():
                            gr.Markdown("**Answer A**")
                            self.compare_a = gr.Markdown(elem_id="compare-a")
                        with gr.Column():
                            gr.Markdown("**Answer B**")
                            self.compare_b = gr.Markdown(elem_id="compare-b")
                    with gr.Row(visible=False) as self.compare_buttons:
                        pick_buttons = {choice: gr.Button(label, elem_id=f"pick-{choice.replace('_', '-')}")
                                        for choice, label in (("a", "A is better"), ("b", "B is better"),
                                                              ("tie", "Tie"), ("both_bad", "Both are bad"))}
                self.textbox = gr.MultimodalTextbox(elem_id="message", file_types=["image"], file_count="multiple",
                                                    placeholder="Ask about an image…", show_label=False,
                                                    sources=["upload"])
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop", variant="stop", scale=0)
                    compare_mode = gr.Checkbox(label="Compare mode: two answers side by side, you pick the better",
                                               elem_id="compare-mode")
                self.info = gr.Markdown(elem_id="reply-info")
                sampling, system_prompt = generation_settings.build_panel()
            if admin is not None:
                self.admin_page = admin_page.AdminPage(admin, self.users)
                self.admin_page.build_tab()
                app.load(self.admin_page.load, None, [self.admin_page.tab, *self.admin_page.timers],
                         api_visibility="private")

            private = dict(api_visibility="private")
            generate = dict(private, concurrency_limit=config.CHAT_CONCURRENCY, concurrency_id="generate")
            quick = dict(private, concurrency_limit=config.FEEDBACK_CONCURRENCY, concurrency_id="feedback")
            stream_outputs = [self.chatbot, self.state, self.sibling_label, self.info, self.conversations,
                              self.textbox, self.compare_panel, self.compare_buttons, self.compare_a, self.compare_b]
            unlock = dict(fn=lambda: gr.MultimodalTextbox(interactive=True), inputs=None, outputs=[self.textbox],
                          **private)

            app.load(self.load, None, [self.conversations, whoami, self.state], **quick)
            sending = self.textbox.submit(self.send, [self.textbox, self.state, *sampling, system_prompt,
                                                      compare_mode], stream_outputs, **generate)
            sending.failure(**unlock)
            regenerating = regenerate.click(self.regenerate, [self.state, *sampling], stream_outputs, **generate)
            retrying = self.chatbot.retry(self.regenerate, [self.state, *sampling], stream_outputs, **generate)
            editing = self.chatbot.edit(self.edit, [self.state, *sampling], stream_outputs, **generate)
            stop.click(cancels=[sending, regenerating, retrying, editing], **unlock)
            self.chatbot.like(self.like, [self.state], [self.state, feedback_panel, reasons, comment], **quick)
            save.click(self.save_feedback, [reasons, comment, self.state], [feedback_panel, self.state], **quick)
            self.chatbot.select(self.select_message, [self.state], [self.state, self.sibling_label], **quick)
            previous.click(self.previous_sibling, [self.state], [self.chatbot, self.state, self.sibling_label], **quick)
            following.click(self.next_sibling, [self.state], [self.chatbot, self.state, self.sibling_label], **quick)
            prefer.click(self.prefer, [self.state], [self.chatbot, self.state, self.sibling_label], **quick)
            for choice, button in pick_buttons.items():
                button.click(self.picker(choice), [self.state],
                             [self.chatbot, self.state, self.sibling_label, self.compare_panel], **quick)
            self.conversations.input(self.open_conversation, [self.conversations, self.state],
                                     [self.chatbot, self.state, self.sibling_label, system_prompt], **quick)
            for trigger in (new_chat.click, self.chatbot.clear):
                trigger(self.new_chat, None, [self.chatbot, self.state, self.sibling_label, self.conversations,
                                                  self.info, self.textbox, feedback_panel, self.compare_panel],
                        cancels=[sending, regenerating, retrying, editing], **private)
        return app


def build_app(service: ChatService, users: Users, notice: str | None = None, admin=None) -> gr.Blocks:
    return ChatPage(service, users).build(service.engine.model_id, notice, admin)
