"""Faults in adapters (issue 16, finding 2), on the demo model with real peft adapters: a version that
passes the registry's metadata and checksum checks but that peft cannot load never breaks chat (the
engine tries it once, stays on the version it had, and the follower reports why to the admin tab),
and activating a version trained on another base model is refused at /activate, not only later."""
import pytest

import fault_figures
from chatapp.core.config import validate_generation
from chatapp.core.errors import EngineError, RequestError
from chatapp.feedback.store import Store
from chatapp.learning.fingerprint import base_fingerprint
from chatapp.learning.registry import Registry, activate_adapter
from chatapp.serving.engine import Engine
from chatapp.serving.hotswap import ActiveFollower
from chatapp.web.admin import AdminService
from chatapp.web.chat import ChatService
from chatapp.web.users import LOCAL
from support import random_lora_folders

GREEDY = validate_generation(temperature=0, max_new_tokens=16)
QUESTION = [{"role": "user", "content": "What can you do?"}]


def metadata(fingerprint: str) -> dict:
    return {"base_model": "demo", "base_fingerprint": fingerprint, "method": "sft-lora",
            "gate": {"decision": "promoted", "reason": "test"}}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A working LoRA adapter folder (saved by peft, random B weights so it changes the answers), the
    same adapter with adapter_config.json naming target modules the base does not have, and the base's
    fingerprint."""
    base = Engine.load("demo").model
    fingerprint = base_fingerprint(base)
    good, broken = random_lora_folders(base, tmp_path_factory.mktemp("adapters"), scale=0.2)
    return good, broken, fingerprint


def test_an_adapter_peft_cannot_load_never_breaks_chat(adapters, tmp_path):
    good, broken, fingerprint = adapters
    data = tmp_path / "data"
    registry = Registry.for_data_dir(data)
    assert registry.publish(good, metadata(fingerprint), activate=True) == "v1"
    assert registry.publish(broken, metadata(fingerprint)) == "v2"  # checksums recorded for the edited config
    registry.validate("v2", fingerprint)  # it passes every check the registry makes

    engine = Engine.load("demo")
    follower = ActiveFollower(engine, registry, fingerprint, log=lambda message: None)
    service = ChatService(engine, Store(data), registry)
    admin = AdminService(service, registry, follower=follower)
    assert follower.check() == "v1"
    first = list(service.chat(LOCAL, "", "What can you do?", [], GREEDY))[-1]
    assert first.done and first.adapter == "v1"

    registry.activate("v2", base_fingerprint=fingerprint, force=True)
    follower.check()  # the switch is handed over; the weights load with the next answer
    answers = [list(service.chat(LOCAL, "", "What can you do?", [], GREEDY))[-1] for _ in range(3)]
    for answer in answers:  # chat goes on, from the version it had
        assert answer.done and answer.text and answer.adapter == "v1"
        assert service.store.generation(answer.message_id)["adapter_version"] == "v1"
    assert engine.adapter == "v1" and "v2" not in engine.loaded_adapters()
    assert "no_such_projection" in engine.adapter_errors["v2"]
    for _ in range(3):  # the follower reports it and does not switch to it again
        assert follower.check() == "v1"
    error = admin.status(LOCAL)["follow_error"]
    assert "v2" in error and "no_such_projection" in error and str(data) not in error
    assert admin.status(LOCAL)["serving"] == "v1"

    # a request that names the broken version gets a clear error without the folder's path
    with pytest.raises(EngineError, match="adapter v2 cannot be loaded") as caught:
        engine.generate(QUESTION, GREEDY, adapter="v2")
    assert str(data) not in str(caught.value)

    # a version that loads is taken up as usual afterwards
    registry.activate("v1", base_fingerprint=fingerprint)
    registry.activate(registry.publish(good, metadata(fingerprint)), base_fingerprint=fingerprint)
    assert follower.check() == "v3"
    assert list(service.chat(LOCAL, "", "What can you do?", [], GREEDY))[-1].adapter == "v3"
    fault_figures.record("adapters", chats_with_a_broken_active_version=3, broken_chats=0)


def test_a_server_whose_active_adapter_cannot_load_still_starts(adapters, tmp_path):
    good, broken, fingerprint = adapters
    data = tmp_path / "data"
    registry = Registry.for_data_dir(data)
    registry.publish(broken, metadata(fingerprint), activate=True)
    engine = Engine.load("demo")
    assert activate_adapter(engine, data, None) is None  # the base answers; the reason is kept
    assert "no_such_projection" in engine.adapter_errors["v1"]
    assert engine.generate(QUESTION, GREEDY).text
    with pytest.raises(EngineError, match="cannot be loaded"):  # a version asked for by name must load
        activate_adapter(Engine.load("demo"), data, "v1")


@pytest.mark.parametrize("with_follower", [True, False])
def test_activate_refuses_an_adapter_trained_on_another_base(adapters, tmp_path, with_follower):
    good, broken, fingerprint = adapters
    data = tmp_path / "data"
    registry = Registry.for_data_dir(data)
    registry.publish(good, metadata(fingerprint), activate=True)
    other = registry.publish(good, metadata("0" * 64))  # what a run on another base model publishes
    engine = Engine.load("demo")
    follower = ActiveFollower(engine, registry, fingerprint, log=lambda message: None) if with_follower else None
    admin = AdminService(ChatService(engine, Store(data), registry), registry, follower=follower)
    with pytest.raises(RequestError, match="trained on another base model"):
        admin.activate(LOCAL, other)
    assert registry.active() == "v1"
    assert admin.activate(LOCAL, "v1") == {"active": "v1"}
    fault_figures.record("adapters", foreign_base_activations=0)
