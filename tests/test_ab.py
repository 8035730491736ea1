"""The A/B test policy (chatapp.learning.ab.ABTest) on a real store and an empty adapter registry:
which versions answer the two sides, picks counted only between the candidate and the live
version, and the automatic decision that ends a test the live version wins clearly. (Promoting a
winning candidate needs a published adapter: tests/test_live_loop.py covers it.)"""
import pytest

from chatapp.feedback.store import AB_LAST_SETTING, AB_SETTING, Store
from chatapp.learning.ab import ABTest
from chatapp.learning.registry import Registry


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "data")


def compared(store, user_id, version_a, version_b) -> dict:
    """A stored comparison whose side a was answered by `version_a` and side b by `version_b`."""
    conversation = store.create_conversation(user_id, "How many shapes are there?")
    question = store.add_message(conversation, None, "user", "How many shapes are there?")
    answers = [store.add_message(conversation, question, "assistant", f"answer of {version}", kind="compare",
                                 generation={"model_id": "demo", "adapter_version": version, "params": {}})
               for version in (version_a, version_b)]
    return store.comparison(store.create_comparison(user_id, question, *answers))


def test_sides_come_from_the_candidate_and_the_serving_version_only_during_a_test(store, tmp_path):
    test = ABTest(store, Registry.for_data_dir(tmp_path / "data"))
    assert test.sides(None) is None and test.status() is None
    test.start("v1", "admin", auto=True, min_votes=4)
    assert store.setting(AB_SETTING)["candidate"] == "v1"
    seen = {test.sides(None) for _ in range(40)}
    assert seen == {("v1", None), (None, "v1")}  # both orders: the user cannot tell the sides apart
    assert test.sides("v1") is None  # the candidate went live meanwhile: nothing left to test
    test.stop("admin")
    assert test.running() is None and test.sides(None) is None


def test_picks_for_the_live_version_end_the_test_and_keep_it(store, tmp_path):
    registry = Registry.for_data_dir(tmp_path / "data")
    test = ABTest(store, registry)
    user = store.ensure_user("alice")
    test.start("v1", "admin", auto=True, min_votes=4)

    same = test.record_pick(compared(store, user, None, None), "a")  # two samples of one version
    assert same == {"versions": {"a": "none", "b": "none"}}
    other = test.record_pick(compared(store, user, "v2", None), "b")  # not the candidate: not counted
    assert other["ab"]["standing"]["picks"] == 0

    for i in range(3):
        result = test.record_pick(compared(store, user, "v1", None), "b")
        assert result["versions"] == {"a": "v1", "b": "none"}
        assert result["ab"]["decision"] == "wait" and result["ab"]["standing"]["live_wins"] == i + 1
    assert store.comparison(1)["pick"] == "a"

    final = test.record_pick(compared(store, user, None, "v1"), "a")["ab"]
    assert final["decision"] == "keep" and final["standing"]["live_wins"] == 4
    assert test.running() is None
    assert store.setting(AB_LAST_SETTING)["ended"] == test.last()["ended"] == "kept live"
    assert registry.active() is None


def test_without_the_policy_or_a_registry_a_clear_result_only_reports(store, tmp_path):
    user = store.ensure_user("alice")
    for test, auto in ((ABTest(store), True), (ABTest(store, Registry.for_data_dir(tmp_path / "data")), False)):
        test.start("v1", "admin", auto=auto, min_votes=4)
        for _ in range(4):
            status = test.record_pick(compared(store, user, "v1", None), "a")["ab"]
        assert status["decision"] == "promote" and status["standing"]["candidate_wins"] == 4
        assert test.running() is not None and test.last() is None
        test.stop("admin")
