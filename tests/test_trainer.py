"""The trainer's plumbing on the demo model: preference data preparation, a short real TRL run
recorded in the store and published in the registry, answers tagged with the adapter that produced
them, `ask`/`serve --adapter`, refusals, and kill -9 during training and publishing."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chatapp.feedback import prefs
from chatapp.learning import simulate
from chatapp.learning.registry import Registry
from chatapp.web.chat import ChatService
from chatapp.core.config import validate_generation
from chatapp.feedback.store import Store
from chatapp.learning.data import NotEnoughFeedback
from chatapp.learning.settings import TrainSettings
from chatapp.learning.trainer import TrainingBusy, run_lock, train
from chatapp.web.users import LOCAL
from support import ROOT, subprocess_env

USERS = [f"user{i}" for i in range(5)]
QUICK = dict(method="kto", start_from="base", max_steps=4, batch_size=4, min_rows=10, probe_per_type=10)


@pytest.fixture(scope="module")
def voted_dir(tmp_path_factory, demo_engine):
    """A data dir with 120 sampled shapes chats from 5 users, each voted by the terse-and-correct rule."""
    data = tmp_path_factory.mktemp("voted")
    store = Store(data)
    logged = simulate.log_chats(store, demo_engine.model, demo_engine.processor, 120, seed=3, users=USERS)
    simulate.vote(store, logged, simulate.style_rule("terse"))
    return data


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_split_cap_and_weights_are_deterministic(voted_dir):
    store = Store(voted_dir)
    rows = prefs.kto_rows(store)
    train_rows, held = prefs.split(rows)
    again_train, again_held = prefs.split(prefs.kto_rows(store))
    assert [p["message_id"] for p in held.provenance] == [p["message_id"] for p in again_held.provenance]
    assert 0.1 < len(held) / len(rows) < 0.3 and not ({prefs.rated_id(p) for p in held.provenance}
                                                       & {prefs.rated_id(p) for p in train_rows.provenance})
    capped = prefs.cap_per_user(train_rows, 0.3)
    shares = [sum(p["user_id"] == u for p in capped.provenance) / len(capped) for u in
              {p["user_id"] for p in capped.provenance}]
    assert max(shares) <= 0.3 + 1e-9
    ups = sum(r["label"] for r in train_rows.rows)
    desirable, undesirable = prefs.kto_weights(train_rows)
    assert desirable * ups == pytest.approx(undesirable * (len(train_rows) - ups))
    # one user with most of the votes is cut to 30%
    skewed = prefs.Rows("kto", rows=list(train_rows.rows),
                        provenance=[dict(p, user_id=1 if i % 4 else p["user_id"]) for i, p in
                                    enumerate(train_rows.provenance)])
    capped = prefs.cap_per_user(skewed, 0.3)
    assert sum(p["user_id"] == 1 for p in capped.provenance) <= 0.3 * len(capped) + 1e-9
    # held-out answers' prompts never reach rejection sampling
    held_parents = {store.message(prefs.rated_id(p))["parent_id"] for p in held.provenance}
    logged = prefs.logged_prompts(store, {prefs.rated_id(p) for p in held.provenance})
    assert logged and not held_parents & {store.message(p["answer_id"])["parent_id"] for p in logged}


@pytest.mark.slow
def test_too_little_feedback_is_refused_clearly(tmp_path, demo_engine):
    store = Store(tmp_path)
    logged = simulate.log_chats(store, demo_engine.model, demo_engine.processor, 6, seed=5, users=USERS)
    simulate.vote(store, logged, simulate.correctness_rule)
    with pytest.raises(NotEnoughFeedback, match="not enough feedback"):
        train(store, Registry.for_data_dir(tmp_path), "demo", TrainSettings(method="kto"))
    assert store.runs() == []
    result = subprocess.run([sys.executable, "-m", "chatapp", "train", "--data-dir", str(tmp_path)], cwd=ROOT,
                            env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: not enough feedback")


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "batch size must be between 1 and 256"),
    (dict(method="ppo"), "method must be one of"),
    (dict(start_from="v3"), "--from must be active or base"),
    (dict(max_user_share=0), "max user share"),
    (dict(learning_rate=5.0), "learning rate"),
    (dict(priority="realtime"), "priority must be idle or nice"),
    (dict(rs_rounds=0), "rs rounds must be between 1 and 5"),
    (dict(rs_extra_epochs=(0,)), "rs extra epochs must be"),
    (dict(gradient_checkpointing="maybe"), "gradient checkpointing must be auto, on or off"),
    (dict(grad_accum=0), "grad accum must be between 1 and 256"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, bad, message):
    from chatapp.core.errors import RequestError

    store = Store(tmp_path)
    with pytest.raises(RequestError, match=message):
        train(store, Registry.for_data_dir(tmp_path), "demo", TrainSettings(**bad))
    assert store.runs() == []


@pytest.mark.parametrize("priority, policy", [("idle", "SCHED_IDLE"), ("nice", "SCHED_OTHER")])
def test_the_training_process_yields_the_cpu_to_the_chat(priority, policy):
    """limit_resources in a fresh process: 1 thread on this 2-core machine, nice 10, and SCHED_IDLE
    unless asked for nice only (what bench/contention.py measured)."""
    code = ("import os, torch; from chatapp.learning.trainer import limit_resources; "
            f"t = limit_resources(None, {priority!r}); "
            "print(t, torch.get_num_threads(), os.nice(0), os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    threads, torch_threads, nice, sched = map(int, out)
    expected_threads = 1 if (os.cpu_count() or 1) <= 2 else max(1, (os.cpu_count() or 2) // 2)
    assert threads == torch_threads == expected_threads
    assert nice >= 10
    assert sched == getattr(os, policy)


@pytest.mark.slow
def test_a_run_is_recorded_published_and_tags_answers(voted_dir, tmp_path, demo_engine):
    data = copy_dir(voted_dir, tmp_path / "data")
    store, registry = Store(data), Registry.for_data_dir(data)
    result = train(store, registry, "demo", TrainSettings(**QUICK, publish="always"), log=lambda m: None)
    run = store.run(result.run_id)
    assert run["status"] == result.decision and run["phase"] == "done" and run["candidate_version"] == "v1"
    assert run["metrics"]["data"]["kto_train"] > 0 and "probe_accuracy" in run["metrics"]["candidate"]
    points = store.run_points(result.run_id)
    assert any(p["name"] == "loss" for p in points)
    meta = registry.show("v1")
    assert meta["method"] == "kto" and meta["feedback"]["count"] == run["metrics"]["data"]["kto_train"]
    assert meta["gate"]["decision"] == result.decision and registry.active() == "v1"
    # the next run starts from the live adapter and records it as the parent
    second = train(store, registry, "demo", TrainSettings(**dict(QUICK, start_from="active"), publish="always"),
                   log=lambda m: None)
    assert second.version == "v2" and registry.show("v2")["parent"] == "v1" and registry.active() == "v2"
    registry.activate("v1", force=True)

    # the server answers with the active adapter; every answer records the version that produced it
    from chatapp.learning.registry import activate_adapter
    from chatapp.serving.engine import Engine

    engine = Engine.load("demo")
    assert activate_adapter(engine, data, None) == "v1"
    service = ChatService(engine, store)
    answer = list(service.chat(LOCAL, "", "What can you do?", [], validate_generation(temperature=0)))[-1]
    assert answer.adapter == "v1" and store.generation(answer.message_id)["adapter_version"] == "v1"
    engine.use_adapter(None)
    base = list(service.chat(LOCAL, "", "What can you do?", [], validate_generation(temperature=0)))[-1]
    assert base.adapter is None and store.generation(base.message_id)["adapter_version"] is None
    asked = subprocess.run([sys.executable, "-m", "chatapp", "ask", "--data-dir", str(data), "--temperature", "0",
                            "--adapter", "none", "What can you do?"], cwd=ROOT,
                           env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0 and "shape" in asked.stdout.lower()
    wrong = subprocess.run([sys.executable, "-m", "chatapp", "ask", "--data-dir", str(data), "--adapter", "v9", "hi"],
                           cwd=ROOT, env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "v9" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_rs_trains_a_candidate_per_epoch_count_and_the_gate_picks_one(voted_dir, tmp_path):
    """The last rejection-sampling round trains the default and the extra-epoch candidates on the same
    kept answers; the gate measures the live policy once and judges each; the chosen one is published
    with every candidate's verdict in its metadata."""
    data = copy_dir(voted_dir, tmp_path / "data")
    store, registry = Store(data), Registry.for_data_dir(data)
    logs = []
    settings = TrainSettings(method="rs", start_from="base", scorer_epochs=5, epochs=1, rs_extra_epochs=(2,),
                             min_rows=10, best_of=2, rs_prompts=32, rs_rounds=1, publish="always")
    result = train(store, registry, "demo", settings, log=logs.append)
    metrics = store.run(result.run_id)["metrics"]
    assert set(metrics["candidates"]) == {"candidate", "candidate-e2"}
    assert [c["epochs"] for c in metrics["candidates"].values()] == [1, 2]
    for verdict in metrics["candidates"].values():
        assert verdict["decision"] in ("promoted", "rejected") and "probe_accuracy" in verdict["metrics"]
    chosen = metrics["chosen"]
    assert metrics["candidates"][chosen]["decision"] == result.decision
    assert f"the {metrics['candidates'][chosen]['epochs']}-epoch candidate" in result.reason
    assert sum("gate: the live policy" in line for line in logs) == 1  # measured once for both candidates
    assert registry.show(result.version)["metrics"]["chosen"] == chosen


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_lora(voted_dir, tmp_path):
    """With activations recomputed in the backward pass (the default for real-size models) the LoRA still
    gets gradients: its B matrices, zero at the start, are not zero after two steps."""
    import torch
    from safetensors.torch import load_file

    data = copy_dir(voted_dir, tmp_path / "data")
    store, registry = Store(data), Registry.for_data_dir(data)
    result = train(store, registry, "demo", TrainSettings(**dict(QUICK, max_steps=2), gradient_checkpointing="on",
                                                          grad_accum=2, publish="always"), log=lambda m: None)
    weights = load_file(str(registry.validate(result.version, None) / "adapter_model.safetensors"))
    b = [w for name, w in weights.items() if "lora_B" in name]
    assert b and all(torch.count_nonzero(w) > 0 for w in b)
    assert registry.show(result.version)["hyperparameters"]["gradient_checkpointing"] == "on"


def test_completion_logps_in_batches_match_one_at_a_time_with_full_logits(demo_engine):
    """The batched scorer (logits only from the earliest completion token on, batches bounded by
    prompt tokens) gives each answer the log-probability a plain full-logits forward gives it alone."""
    import random

    import torch

    from chatapp.learning import modelops
    from chatapp.demo import shapes

    model, processor = demo_engine.model, demo_engine.processor
    rng = random.Random(3)
    items = []
    for i in range(6):
        example = shapes.random_example(rng, ("color", "count", "describe")[i % 3])
        items.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}],
                      "images": [shapes.render(example.scene)], "completion": example.answer})
    items.append({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hello! What can you do?"}]}],
                  "images": [], "completion": "I answer questions about shapes."})
    batched = modelops.completion_logps(model, processor, items, batch_size=4)
    for item, value in zip(items, batched):
        template = processor.apply_chat_template
        prompt = template(item["prompt"], add_generation_prompt=True)
        full = template(item["prompt"] + [{"role": "assistant", "content": [{"type": "text", "text": item["completion"]}]}])
        images = [item["images"]] if item["images"] else None
        n_prompt = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
        inputs = processor(text=[full], images=images, return_tensors="pt")
        with torch.inference_mode():
            logps = torch.log_softmax(model(**inputs).logits.float()[0, :-1], dim=-1)
        ids = inputs["input_ids"][0, 1:]
        expected = logps[torch.arange(len(ids)), ids][n_prompt - 1:].sum()
        assert float(value) == pytest.approx(float(expected), abs=1e-3)
    # a long prompt gets small batches
    long = [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "red " * 1500}]}], "images": []}] * 5
    sizes = [len(b) for b in modelops._groups(long, 32, processor)]
    assert sum(sizes) == 5 and max(sizes) <= max(1, modelops.BATCH_TOKENS // 1500)


@pytest.mark.slow
def test_prompt_token_counts_from_the_full_texts_match_the_prompts_processed_alone(tmp_path):
    """The scorer preprocesses images once (the prompt's length comes from the full text's): on the
    SmolVLM-sized processor, at both details, with one and two images, it counts what processing the
    prompt alone counts."""
    import random

    import torch
    from transformers import AutoProcessor

    from chatapp.demo import shapes
    from chatapp.demo.smolvlm_sized import build_smolvlm_sized_random
    from chatapp.learning import modelops
    from chatapp.serving.messages import image_detail_kwargs

    processor = AutoProcessor.from_pretrained(str(build_smolvlm_sized_random(tmp_path / "smolvlm")))
    rng = random.Random(5)
    for detail in ("low", "high"):
        for count, answer in ((1, "A red circle."), (2, "Two: a green square left of a blue triangle, then nothing.")):
            prompt = [{"role": "user", "content": [{"type": "image"}] * count + [{"type": "text", "text": "Describe."}]}]
            images = [shapes.render(shapes.random_scene(rng)) for _ in range(count)]
            prompt_text = processor.apply_chat_template(prompt, add_generation_prompt=True)
            full_text = processor.apply_chat_template(prompt + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}])
            kwargs = image_detail_kwargs(processor, detail)
            alone = processor(text=[prompt_text], images=[images], return_tensors="pt", **kwargs)["input_ids"].shape[1]
            full = processor(text=[full_text], images=[images], return_tensors="pt", **kwargs)["input_ids"].shape[1]
            counted = modelops.prompt_token_counts(processor, [prompt_text], [full_text], torch.tensor([full]))
            assert int(counted[0]) == alone > 64 * count, (detail, count)


def test_anchor_rows_are_the_policys_own_greedy_answers_to_text_only_openers():
    """rs trains the candidate on the served policy's own answers to a few text-only openers beside the kept
    answers (about `anchor_share` of the rows), so that training on image answers leaves text-only ones alone."""
    from peft import get_peft_model

    from chatapp.learning import modelops, rejection
    from chatapp.learning.sampler import InProcessSampler
    from chatapp.learning.trl_runs import lora_config
    from chatapp.serving.engine import Engine

    engine, plain = Engine.load("demo"), Engine.load("demo")  # own copies: the LoRA wrapper stays in this test
    model = get_peft_model(engine.model, lora_config(TrainSettings()))
    rows = rejection._anchor_rows(model, engine.processor, None, TrainSettings(), InProcessSampler())
    assert [r["prompt"][0]["content"][0]["text"] for r in rows] == list(rejection.ANCHOR_PROMPTS)
    assert all(r["images"] == [] for r in rows)
    greedy = modelops.sample_answers(plain.model, plain.processor,
                                     [{"prompt": r["prompt"], "images": []} for r in rows], 1, temperature=0.0)
    assert [r["completion"][0]["content"][0]["text"] for r in rows] == [g[0] for g in greedy]
    assert all(g[0] for g in greedy)
    assert len(rejection._share(rows, 500, 0.1)) == len(rows) * round(50 / len(rows))
    assert rejection._share(rows, 10, 0.1) == rows  # each at least once
    assert rejection._anchor_rows(model, engine.processor, None, TrainSettings(anchor_share=0.0),
                                  InProcessSampler()) == []


def test_the_gate_asks_for_an_auc_above_chance():
    """The p-value of a held-out AUC matches what random votes do (a permutation count, counted here
    from ranks, not by the gate), with and without tied scores, and the gate's verdict names both bars."""
    import random

    from chatapp.learning import gate

    rng = random.Random(0)

    def ranks(scores):  # 1-based, ties sharing their average rank
        order = sorted(range(len(scores)), key=scores.__getitem__)
        result, i = [0.0] * len(scores), 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
                j += 1
            for k in order[i:j + 1]:
                result[k] = (i + j) / 2 + 1
            i = j + 1
        return result

    def split(scores, n_liked, target):
        """Liked and disliked scores: a random labelling whose AUC is within half a point of `target`."""
        while True:
            labels = [True] * n_liked + [False] * (len(scores) - n_liked)
            rng.shuffle(labels)
            liked = [s for s, up in zip(scores, labels) if up]
            disliked = [s for s, up in zip(scores, labels) if not up]
            if abs(gate.auc(liked, disliked) - target) < 0.005:
                return liked, disliked

    for decimals in (6, 1):  # 1 decimal: many ties
        scores = [round(rng.random(), decimals) for _ in range(47)]
        rank = ranks(scores)
        for value in (0.6, 0.65, 0.7):
            liked, disliked = split(scores, 28, value)
            observed, p_value = gate.auc_and_p(liked, disliked)
            count, at_least = 3000, 0
            for _ in range(count):
                picked = rng.sample(range(47), 28)
                at_least += (sum(rank[i] for i in picked) - 28 * 29 / 2) / (28 * 19) >= observed - 1e-12
            assert abs(p_value - at_least / count) < 0.03, (decimals, value, p_value, at_least / count)
    settings = gate.GateSettings()
    scores = [rng.random() for _ in range(47)]
    liked, disliked = split(scores, 28, 0.71)
    strong = gate.auc_and_p(liked, disliked)
    assert gate.auc_shortfall({"auc": strong[0], "auc_p": strong[1], "liked": 28, "disliked": 19}, settings) is None
    liked, disliked = split(scores[:21], 12, 0.63)
    weak_auc, weak_p = gate.auc_and_p(liked, disliked)
    weak = gate.auc_shortfall({"auc": weak_auc, "auc_p": weak_p, "liked": 12, "disliked": 9}, settings)
    assert weak.startswith("held-out AUC 0.63 could be chance, p = 0.") and weak.endswith("with 12 liked / 9 disliked")
    assert gate.auc_shortfall({"auc": 0.55, "auc_p": 0.001, "liked": 900, "disliked": 900}, settings) == \
        "held-out AUC 0.55 < 0.6"


@pytest.mark.slow
def test_the_votes_temperature_is_what_the_candidate_is_trained_for(voted_dir):
    """The rated answers were sampled at temperature 1 (simulate.log_chats): that is the temperature
    the candidate is trained and judged for, unless the settings name one."""
    from chatapp.learning.data import prepare_data

    rows = prefs.kto_rows(Store(voted_dir))
    assert {p["temperature"] for p in rows.provenance} == {1.0}
    assert prefs.sampling_temperature(rows) == 1.0
    assert prefs.sampling_temperature(prefs.Rows("kto", provenance=[{"temperature": 0.0}, {}])) is None
    assert prepare_data(Store(voted_dir), TrainSettings()).temperature == 1.0
    assert prepare_data(Store(voted_dir), TrainSettings(temperature=1.6)).temperature == 1.6
    with pytest.raises(Exception, match="temperature must be in"):
        TrainSettings(temperature=0).validate()


@pytest.mark.slow
def test_sft_at_a_temperature_takes_its_loss_on_the_divided_logits(voted_dir, tmp_path):
    """SFT for temperature 2 starts from a higher loss than at 1 on the same rows (the demo model's
    own answers are its likely tokens, which dividing the logits makes less likely; measured 0.23 ->
    0.30), and the run records the temperature."""
    first_losses = {}
    for temperature in (1.0, 2.0):
        data = copy_dir(voted_dir, tmp_path / f"t{temperature}")
        store = Store(data)
        result = train(store, Registry.for_data_dir(data), "demo",
                       TrainSettings(method="sft", start_from="base", max_steps=1, batch_size=8, min_rows=10,
                                     temperature=temperature, publish="never", learning_rate=1e-9), log=lambda m: None)
        points = [p for p in store.run_points(result.run_id) if p["name"] == "loss"]
        first_losses[temperature] = points[0]["value"]
        assert result.metrics["data"]["temperature"] == temperature
    assert first_losses[2.0] > 1.1 * first_losses[1.0] > 0


def test_cpu_training_scores_only_labelled_positions_with_the_same_log_probs():
    """The trainer has TRL's fused LM head project only the positions with a label on the CPU (the
    prompt's image positions are most of a real model's training memory); the per-token
    log-probabilities, the loss and the gradients are the same as when every position is projected."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl.trainer import utils as trl_utils

    from chatapp.serving import loading
    from chatapp.demo import shapes
    from chatapp.learning import trl_runs

    path = loading.resolve_model_path("demo")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    trl_utils.add_fused_lm_head(model)
    example = shapes.random_example(__import__("random").Random(5), "color")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": " Red."}]}]
    image = [[shapes.render(example.scene)]]
    inputs = processor(text=[processor.apply_chat_template(prompt + answer)], images=image, return_tensors="pt")
    prompt_length = processor(text=[processor.apply_chat_template(prompt, add_generation_prompt=True)], images=image,
                              return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100

    def run():
        model.zero_grad()
        out = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        out.loss.backward()
        return out.log_probs.detach(), out.loss.detach(), model.lm_head.weight.grad.clone()

    assert not trl_utils._use_triton(torch.device("cpu"))
    every = run()
    with trl_runs._score_labelled_positions_only():
        assert trl_utils._use_triton(torch.device("cpu"))
        labelled = run()
    assert not trl_utils._use_triton(torch.device("cpu"))  # restored
    assert (labels[:, 1:] != -100).sum() < labels.shape[1] / 4  # most positions are the prompt's
    for a, b in zip(every, labelled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_run_at_a_time(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(TrainingBusy):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released when the holder ends
        pass


TRAIN_CHILD = r"""
import sys
from chatapp.learning.registry import Registry
from chatapp.feedback.store import Store
from chatapp.learning.settings import TrainSettings
from chatapp.learning.trainer import train
data = sys.argv[1]
settings = TrainSettings(method="kto", start_from="base", max_steps=int(sys.argv[2]), batch_size=4, min_rows=10,
                         probe_per_type=10, publish="always")
print(train(Store(data), Registry.for_data_dir(data), "demo", settings, log=lambda m: print(m, flush=True)).version,
      flush=True)
"""


@pytest.mark.parametrize("kill_at", ["training", "after-weights", "before-rename", "after-rename",
                                     "before-active-replace", "after-active-replace"])
@pytest.mark.slow
def test_kill_9_never_breaks_the_active_adapter(voted_dir, tmp_path, kill_at, demo_engine):
    from peft import PeftModel

    data = copy_dir(voted_dir, tmp_path / "data")
    store, registry = Store(data), Registry.for_data_dir(data)
    first = train(store, registry, "demo", TrainSettings(**QUICK, publish="always"), log=lambda m: None)
    assert registry.active() == first.version == "v1"

    env = subprocess_env(HF_HUB_OFFLINE="1")
    steps = 4
    if kill_at == "training":
        steps = 400  # killed while TRL is stepping
    else:
        env["CHATAPP_CRASH_AT"] = kill_at  # the registry kills its own process at that point
    child = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, str(data), str(steps)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_at == "training":
        deadline = time.time() + 120
        while time.time() < deadline:
            run = store.runs()[0]
            if run["id"] != first.run_id and (run["step"] or 0) >= 2:
                break
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=180)
    assert child.returncode == -signal.SIGKILL, child.stdout.read()

    # the active adapter is intact and loadable; the dead run is marked failed at the next start, unless
    # it had activated its adapter: then it keeps its decision (issue 16, finding 10)
    registry = Registry.for_data_dir(data)
    active = registry.active()
    activated = kill_at == "after-active-replace"
    assert active == ("v2" if activated else "v1")  # every other kill point is before the pointer is replaced
    from chatapp.learning.fingerprint import base_fingerprint

    path = registry.validate(active, base_fingerprint(demo_engine.model))
    PeftModel.from_pretrained(__import__("chatapp.serving.engine", fromlist=["Engine"]).Engine.load("demo").model, str(path))
    assert all(v.startswith("v") for v in registry.versions())
    again = train(store, registry, "demo", TrainSettings(**QUICK, publish="always"), log=lambda m: None)
    runs = {r["id"]: r for r in store.runs()}
    dead = [r for r in runs.values() if r["id"] not in (first.run_id, again.run_id)]
    assert len(dead) == 1 and "died" in dead[0]["error"]
    if activated:
        assert dead[0]["status"] == dead[0]["decision"] != "failed" and dead[0]["candidate_version"] == "v2"
    else:
        assert dead[0]["status"] == "failed"
    assert again.version == f"v{len(registry.versions())}" and registry.active() == again.version
