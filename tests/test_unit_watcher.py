"""When the background trainer starts a run (`watcher.due`), on a real store in a temp folder:
enough new labels, an admin's request, the schedule, and the wait after a failed run."""
import pytest

from chatapp.core.errors import RequestError
from chatapp.feedback.store import Store
from chatapp.learning import watcher
from chatapp.learning.settings import WatchSettings

LONG_AGO = "2000-01-01T00:00:00+00:00"


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "data")


def answer(store) -> tuple[int, int]:
    """A user and one answer of theirs, ready to be voted on."""
    user = store.ensure_user("alice")
    conversation = store.create_conversation(user, "t")
    question = store.add_message(conversation, None, "user", "What shape is it?")
    return user, store.add_message(conversation, question, "assistant", "A circle.")


def vote(store, n: int = 1) -> None:
    for _ in range(n):
        store.set_vote(*answer(store), "up")


def finished_run(store, status: str = "rejected", finished_at: str | None = None) -> int:
    run = store.create_run("kto", {}, None)
    store.finish_run(run, status)
    if finished_at:
        store.update_run(run, finished_at=finished_at)
    return run


def test_a_run_starts_when_enough_new_labels_arrived(store):
    settings = WatchSettings(train_after=3, quiet_s=0)
    assert watcher.due(store, settings) == (None, "waiting for feedback: 0 of 3 new labels")
    vote(store, 2)
    assert watcher.due(store, settings) == (None, "waiting for feedback: 2 of 3 new labels")
    vote(store)
    assert watcher.due(store, settings) == ("labels", "training now: 3 new labels (threshold 3)")


def test_votes_preferences_and_compare_picks_all_count_as_labels(store):
    user, first = answer(store)
    message = store.message(first)
    second = store.add_message(message["conversation_id"], message["parent_id"], "assistant", "Round.")
    store.prefer(user, second)
    comparison = store.create_comparison(user, message["parent_id"], first, second)
    assert watcher.due(store, WatchSettings(train_after=2))[0] is None  # an undecided comparison is no label
    store.pick(comparison, "a")
    assert watcher.due(store, WatchSettings(train_after=2, quiet_s=0)) == ("labels", "training now: 2 new labels (threshold 2)")


def test_labels_count_from_the_start_of_the_newest_run_that_did_its_work(store):
    settings = WatchSettings(train_after=2)
    vote(store, 3)
    run = store.create_run("kto", {}, None)
    vote(store)  # given while the run trains: it counts toward the next one
    store.finish_run(run, "promoted")
    assert watcher.due(store, settings) == (None, "waiting for feedback: 1 of 2 new labels")
    # a failed run does not reset the count: the same labels are tried again after the retry wait
    failed = finished_run(store, "failed")
    assert watcher.due(store, WatchSettings(train_after=1, retry_s=0, quiet_s=0)) == \
        ("labels", "training now: 1 new labels (threshold 1)")
    reason, message = watcher.due(store, WatchSettings(train_after=1, retry_s=300))
    assert reason is None and message.startswith(f"run {failed} failed; retrying in ")
    assert message.endswith(" s (1 new labels)") and 295 <= int(message.split()[5]) <= 300


def test_a_failed_run_holds_back_even_a_request_until_the_retry_wait_is_over(store):
    store.request_training("root")
    finished_run(store, "failed")
    assert watcher.due(store, WatchSettings(retry_s=300))[0] is None
    finished_run(store, "failed", finished_at=LONG_AGO)
    assert watcher.due(store, WatchSettings(retry_s=300)) == ("request", "training now: asked by root")


def test_an_admin_request_starts_a_run_without_new_labels(store):
    assert watcher.due(store, WatchSettings())[0] is None
    store.request_training("root")
    store.request_training("dora")  # one open request is enough: the first one names who asked
    assert watcher.due(store, WatchSettings()) == ("request", "training now: asked by root")
    store.take_training_request(store.open_training_request()["id"], None)
    assert watcher.due(store, WatchSettings())[0] is None


def test_the_schedule_needs_a_new_label_and_the_interval_since_the_last_run(store):
    settings = WatchSettings(train_after=50, train_every_s=60, quiet_s=0)
    assert watcher.due(store, settings)[0] is None  # nothing new: no run, whatever the schedule
    vote(store)  # and no run has ever finished: the schedule is due at once
    assert watcher.due(store, settings) == ("schedule", "training now: scheduled every 60 s (1 new labels)")
    finished_run(store)
    vote(store)
    assert watcher.due(store, settings) == (None, "waiting for feedback: 1 of 50 new labels")  # finished just now
    store.update_run(store.last_run()["id"], finished_at=LONG_AGO)
    assert watcher.due(store, settings)[0] == "schedule"
    assert watcher.due(store, WatchSettings(train_after=50))[0] is None  # without a schedule, only the threshold


@pytest.mark.parametrize("settings, message", [
    (WatchSettings(train_after=0), "--train-after"),
    (WatchSettings(train_every_s=5), "--train-every"),
    (WatchSettings(retry_s=-1), "--retry-after"),
    (WatchSettings(poll_s=0), "--poll"),
])
def test_watch_settings_refuse_what_would_spin_or_never_fire(settings, message):
    """Each refusal names the command-line option to change."""
    with pytest.raises(RequestError, match=message):
        settings.validate()
