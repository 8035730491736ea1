"""Who may do what, checked where it is decided: the users file (`web.users`), ownership in the chat
service (`web.chat`) and the admin role in the admin service (`web.admin`). Real stores, users
files and registries in a temp folder; no engine: every refusal must come before generation (the
services get None, so reaching the model would fail loudly)."""
import pytest

from chatapp.core.errors import AccessDenied, RequestError
from chatapp.feedback.store import Store
from chatapp.learning.registry import Registry
from chatapp.web.admin import AdminService
from chatapp.web.chat import ChatService
from chatapp.web.users import LOCAL, MAX_FAILED_LOGINS, User, UserError, Users, check_bind, is_loopback

ALICE, BOB, ROOT_ADMIN = User("alice", "user"), User("bob", "user"), User("root", "admin")


# ---------------------------------------------------------------- the users file

def test_without_a_users_file_everyone_is_the_local_admin(tmp_path):
    users = Users(tmp_path)
    assert not users.enabled
    assert users.get(None) == users.get("anyone") == LOCAL and LOCAL.is_admin
    users.add("dora", "dora-password")
    users.add("root", "root-password", role="admin")
    assert users.enabled
    assert users.get("dora") == User("dora", "user") and not users.get("dora").is_admin
    assert users.get("root").is_admin
    assert users.get(None) is None and users.get("local") is None and users.get("mallory") is None
    users.remove("root")
    assert users.get("root") is None and [u.name for u in users.list()] == ["dora"]


@pytest.mark.parametrize("name, password, role, message", [
    ("local", "long-enough", "user", "built-in user"),
    ("-dash", "long-enough", "user", "user name"),
    ("x" * 65, "long-enough", "user", "user name"),
    ("erin", "short", "user", "at least 8 characters"),
    ("erin", "long-enough", "root", "role must be one of user, admin"),
])
def test_names_roles_and_passwords_are_checked_on_add(tmp_path, name, password, role, message):
    with pytest.raises(UserError, match=message):
        Users(tmp_path).add(name, password, role)
    assert not (tmp_path / "users.json").exists()


def test_a_role_changes_only_with_replace(tmp_path):
    users = Users(tmp_path)
    users.add("dora", "dora-password")
    with pytest.raises(UserError, match="exists"):
        users.add("dora", "dora-password", role="admin")
    assert not users.get("dora").is_admin
    users.add("dora", "dora-password", role="admin", replace=True)
    assert users.get("dora").is_admin


def test_a_throttled_name_is_refused_even_with_the_right_password(tmp_path):
    users = Users(tmp_path)
    users.add("dora", "dora-password")
    address = "203.0.113.7"
    for _ in range(MAX_FAILED_LOGINS - 1):
        assert not users.authenticate("dora", "wrong", address)
    assert not users.throttled("dora", address) and users.authenticate("dora", "dora-password", address)
    for _ in range(MAX_FAILED_LOGINS):  # a success starts the count again
        assert not users.authenticate("dora", "wrong", address)
    assert users.throttled("dora", address) and not users.authenticate("dora", "dora-password", address)
    # the lockout holds for that address only: dora still logs in from elsewhere
    assert users.authenticate("dora", "dora-password", "198.51.100.2")
    assert not users.authenticate("nobody", "dora-password", address) and not users.authenticate("", "", address)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("::", False), ("example.com", False)])
def test_only_loopback_addresses_may_serve_without_logins(tmp_path, host, loopback):
    users = Users(tmp_path)
    assert is_loopback(host) is loopback
    if loopback:
        check_bind(host, users)
    else:
        with pytest.raises(UserError, match=f"refusing to listen on {host} without logins"):
            check_bind(host, users)
    users.add("dora", "dora-password")
    check_bind(host, users)  # with logins on, any address


# ---------------------------------------------------------------- ownership in the chat service

@pytest.fixture
def chat(tmp_path):
    """Alice's conversation (a question and two answers, compared) in a real store."""
    service = ChatService(None, Store(tmp_path / "data"))
    store, alice = service.store, service.user_id(ALICE)
    conversation = store.create_conversation(alice, "shapes")
    question = store.add_message(conversation, None, "user", "What shape is it?")
    first = store.add_message(conversation, question, "assistant", "A circle.")
    second = store.add_message(conversation, question, "assistant", "Round.")
    comparison = store.create_comparison(alice, question, first, second)
    service.ids = dict(conversation=conversation, question=question, answer=first, other=second,
                       comparison=comparison)
    return service


@pytest.mark.parametrize("intruder", [BOB, ROOT_ADMIN], ids=["another user", "an admin"])
def test_nobody_else_reaches_a_users_conversation(chat, intruder):
    ids = chat.ids
    refusals = {
        "conversation": lambda: chat.conversation(intruder, ids["conversation"]),
        "system prompt": lambda: chat.system_prompt(intruder, ids["conversation"]),
        "message": lambda: chat.message(intruder, ids["answer"]),
        "select": lambda: chat.select(intruder, ids["other"]),
        "vote": lambda: chat.vote(intruder, ids["answer"], "up"),
        "current vote": lambda: chat.current_vote(intruder, ids["answer"]),
        "prefer": lambda: chat.prefer(intruder, ids["other"]),
        "pick": lambda: chat.compare_pick(intruder, ids["comparison"], "a"),
        "continue": lambda: next(chat.chat(intruder, ids["conversation"], "and now?")),
        "regenerate": lambda: next(chat.regenerate(intruder, ids["answer"])),
        "edit": lambda: next(chat.edit(intruder, ids["question"], "What colour is it?")),
    }
    for action, call in refusals.items():
        with pytest.raises(AccessDenied, match="does not exist or is not yours"):
            call()
    store = chat.store
    assert store.labels_since(None) == 0 and store.comparison(ids["comparison"])["pick"] is None
    assert len(store.path_to(store.conversation(ids["conversation"])["leaf_id"])) == 2  # nothing added
    assert chat.conversations(intruder) == []


def test_missing_ids_get_the_same_answer_as_other_peoples(chat):
    for call in (lambda: chat.conversation(ALICE, 999), lambda: chat.vote(ALICE, 999, "up"),
                 lambda: chat.compare_pick(ALICE, 999, "a")):
        with pytest.raises(AccessDenied, match="999 does not exist or is not yours"):
            call()


def test_the_owner_reaches_their_own(chat):
    ids = chat.ids
    assert [m["id"] for m in chat.conversation(ALICE, ids["conversation"])["messages"]] == [ids["question"],
                                                                                            ids["other"]]
    assert chat.vote(ALICE, ids["answer"], "up")["vote"] == "up"
    assert chat.current_vote(ALICE, ids["answer"])["vote"] == "up"
    assert chat.prefer(ALICE, ids["answer"])["rejected"] == [ids["other"]]
    assert chat.compare_pick(ALICE, ids["comparison"], "b")["message_id"] == ids["other"]
    assert chat.store.labels_since(None) == 3
    # the role must fit too: votes are for answers, edits for questions
    with pytest.raises(RequestError, match="not an assistant message"):
        chat.vote(ALICE, ids["question"], "up")
    with pytest.raises(RequestError, match="not a user message"):
        next(chat.edit(ALICE, ids["answer"], "changed"))


def test_statistics_and_named_versions_are_for_admins(chat):
    with pytest.raises(AccessDenied, match="for admins only"):
        chat.feedback_stats(ALICE)
    assert chat.feedback_stats(ROOT_ADMIN)["messages"] == 3
    with pytest.raises(AccessDenied, match="for admins only"):
        next(chat.compare(ALICE, chat.ids["conversation"], "again", versions=("base", "live")))
    assert chat.store.feedback_stats()["messages"] == 3  # refused before the question was stored


# ---------------------------------------------------------------- the admin service

@pytest.fixture
def admin(chat, tmp_path):
    return AdminService(chat, Registry.for_data_dir(tmp_path / "data"))


ADMIN_ACTIONS = {
    "status": lambda a, u: a.status(u),
    "runs": lambda a, u: a.runs(u),
    "train now": lambda a, u: a.train_now(u),
    "adapters": lambda a, u: a.adapters(u),
    "activate": lambda a, u: a.activate(u, "base"),
    "rollback": lambda a, u: a.rollback(u),
    "feedback stats": lambda a, u: a.feedback_stats(u),
    "export": lambda a, u: a.export(u, "kto"),
    "A/B status": lambda a, u: a.ab_status(u),
    "A/B start": lambda a, u: a.ab_start(u, "base"),
    "A/B stop": lambda a, u: a.ab_stop(u),
}


@pytest.mark.parametrize("action", ADMIN_ACTIONS)
def test_every_admin_action_refuses_a_non_admin_and_changes_nothing(admin, action):
    with pytest.raises(AccessDenied, match="for admins only"):
        ADMIN_ACTIONS[action](admin, ALICE)
    assert admin.store.open_training_request() is None and admin.ab.running() is None
    assert admin.registry.active() is None


def test_an_admin_may_ask_for_training(admin):
    assert admin.train_now(ROOT_ADMIN)["message"].startswith("training requested")
    assert admin.store.open_training_request()["requested_by"] == "root"
