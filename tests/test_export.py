"""Feedback export (chatapp.feedback.prefs + chatapp.feedback.export): a realistic store, the exact rows, and one TRL step
(KTO, DPO, SFT) on each exported file as it is, through the one documented load call."""
import argparse
import io
import json
import math
import random

import pytest

from chatapp.core import config
from chatapp.feedback import export, prefs
from chatapp.demo import shapes
from chatapp.feedback.images import load_image
from chatapp.feedback.store import Store

SYSTEM = "You answer questions about images."
HELLO_ANSWER = shapes.answer("capabilities", "terse", None)


def add_image(store, rng):
    scene = shapes.random_scene(rng)
    buffer = io.BytesIO()
    shapes.render(scene).save(buffer, format="PNG")
    return scene, store.save_image(load_image(buffer.getvalue(), name="upload.png"))


def ask(store, conversation, parent, text, images=()):
    return store.add_message(conversation, parent, "user", text, image_shas=[i.sha256 for i in images])


def answer(store, conversation, parent, text, system="", finish="stop", kind="chat"):
    generation = {"model_id": "demo", "adapter_version": None, "params": {"temperature": 0.7}, "seed": 7,
                  "system_prompt": system, "prompt_tokens": 40, "reply_tokens": 6, "time_to_first_token_s": 0.01,
                  "tokens_per_s": 200.0, "total_s": 0.04, "finish_reason": finish, "trimmed_messages": 0}
    return store.add_message(conversation, parent, "assistant", text, kind=kind, generation=generation)


def user(text, n_images=0):
    return {"role": "user", "content": [prefs.image_part()] * n_images + [prefs.text_part(text)]}


def assistant(text):
    return {"role": "assistant", "content": [prefs.text_part(text)]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two users' conversations, votes, regenerations and comparisons, made through the store's API."""
    store = Store(tmp_path_factory.mktemp("store") / "data")
    rng = random.Random(11)
    alice, bob = store.ensure_user("alice"), store.ensure_user("bob")
    w = {"store": store, "alice": alice, "bob": bob}

    # 1. alice, system prompt, one image, liked.
    scene, img1 = add_image(store, rng)
    c1 = store.create_conversation(alice, "circle", SYSTEM)
    u1 = ask(store, c1, None, "What color is the circle?", [img1])
    a1 = answer(store, c1, u1, shapes.answer("color", "terse", scene, ("circle",)), system=SYSTEM)
    store.set_vote(alice, a1, "up")
    # 2. alice greets (no image), liked; bob greets in his own chat, gets the same reply, likes it too.
    c2 = store.create_conversation(alice, "Hello!")
    a2 = answer(store, c2, ask(store, c2, None, "Hello!"), HELLO_ANSWER)
    store.set_vote(alice, a2, "up")
    c2b = store.create_conversation(bob, "Hello!")
    a2b = answer(store, c2b, ask(store, c2b, None, "Hello!"), HELLO_ANSWER)
    store.set_vote(bob, a2b, "up")
    # 3. bob, multi-turn with an image in each user turn; the second answer disliked.
    scene_b, img2 = add_image(store, rng)
    scene_c, img3 = add_image(store, rng)
    c3 = store.create_conversation(bob, "count")
    u31 = ask(store, c3, None, "How many shapes are there?", [img2])
    a31 = answer(store, c3, u31, shapes.answer("count", "terse", scene_b))
    u32 = ask(store, c3, a31, "Describe the image.", [img3])
    a32 = answer(store, c3, u32, " " + shapes.answer("describe", "chatty", scene_c) + "\n")  # stored unstripped
    store.set_vote(bob, a32, "down")
    # 4. bob regenerates twice and prefers the second answer; votes it up and the first down.
    scene_d, img4 = add_image(store, rng)
    c4 = store.create_conversation(bob, "square")
    u4 = ask(store, c4, None, "Is there a red square?", [img4])
    r1 = answer(store, c4, u4, shapes.answer("exists", "chatty", scene_d, ("red", "square")))
    r2 = answer(store, c4, u4, shapes.answer("exists", "terse", scene_d, ("red", "square")), kind="regenerate")
    r3 = answer(store, c4, u4, shapes.answer("exists", "plain", scene_d, ("red", "square")), kind="regenerate")
    store.prefer(bob, r2)
    store.set_vote(bob, r1, "down")
    store.set_vote(bob, r2, "up")
    # 5. alice compares two answers and picks a; 6. another comparison ends in a tie.
    scene_e, img5 = add_image(store, rng)
    c5 = store.create_conversation(alice, "shapes")
    u5 = ask(store, c5, None, "What shapes do you see?", [img5])
    b1 = answer(store, c5, u5, shapes.answer("shapes", "terse", scene_e), kind="compare")
    b2 = answer(store, c5, u5, shapes.answer("shapes", "chatty", scene_e), kind="compare")
    store.pick(store.create_comparison(alice, u5, b1, b2), "a")
    scene_f, img6 = add_image(store, rng)
    c6 = store.create_conversation(alice, "tie")
    u6 = ask(store, c6, None, "Describe the image.", [img6])
    t1 = answer(store, c6, u6, shapes.answer("describe", "plain", scene_f), kind="compare")
    t2 = answer(store, c6, u6, shapes.answer("describe", "terse", scene_f), kind="compare")
    store.pick(store.create_comparison(alice, u6, t1, t2), "tie")
    # 7. a liked answer cut off by max_new_tokens, and a vote changed then withdrawn.
    c7 = store.create_conversation(alice, "cut")
    cut = answer(store, c7, ask(store, c7, None, "What can you do?"), "I can answer questions about",
                 finish="length")
    store.set_vote(alice, cut, "up")
    store.set_vote(alice, b2, "down")
    store.set_vote(alice, b2, None)

    w.update(img=[img1, img2, img3, img4, img5, img6], scenes=[scene, scene_b, scene_c, scene_d, scene_e],
             ids=dict(a1=a1, a2=a2, a2b=a2b, a31=a31, a32=a32, r1=r1, r2=r2, r3=r3, b1=b1, b2=b2, t1=t1, t2=t2, cut=cut))
    return w


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    summaries = {fmt: export.export(world["store"], fmt, out) for fmt in prefs.FORMATS}
    return out, summaries


def test_kto_rows_rebuild_prompts_with_images_in_order(world):
    store, ids, img = world["store"], world["ids"], world["img"]
    kto = prefs.kto_rows(store)
    by_message = {p["message_id"]: (row, p) for row, p in zip(kto.rows, kto.provenance)}
    # Everything TRL sees, and nothing else.
    assert all(list(row) == ["images", "prompt", "completion", "label"] for row in kto)
    assert [p["message_id"] for p in kto.provenance] == [ids["a1"], ids["a2"], ids["a32"], ids["r1"], ids["r2"]]
    assert [row["label"] for row in kto] == [True, True, False, False, True]

    row, prov = by_message[ids["a1"]]
    assert row == {
        "images": [str(img[0].path)],
        "prompt": [{"role": "system", "content": [prefs.text_part(SYSTEM)]}, user("What color is the circle?", 1)],
        "completion": [assistant(store.message(ids["a1"])["text"])],
        "label": True}
    assert prov["user_name"] == "alice" and prov["user_id"] == world["alice"] and prov["vote"] == "up"

    row, prov = by_message[ids["a32"]]  # multi-turn: both images, in order; the earlier answer as text
    assert row["images"] == [str(img[1].path), str(img[2].path)]
    assert row["prompt"] == [user("How many shapes are there?", 1), assistant(store.message(ids["a31"])["text"]),
                             user("Describe the image.", 1)]
    assert row["completion"] == [assistant(store.message(ids["a32"])["text"].strip())]  # no leading space
    assert row["label"] is False and prov["user_name"] == "bob"

    # The greeting (no image) liked by alice and, with the same reply, by bob: one row, bob's merged into it.
    row, prov = by_message[ids["a2"]]
    assert row == {"images": [], "prompt": [user("Hello!")], "completion": [assistant(HELLO_ANSWER)], "label": True}
    assert [(d["message_id"], d["user_name"]) for d in prov["duplicates"]] == [(ids["a2b"], "bob")]
    # The cut-off answer was liked, but the model never ended it: no positive target.
    assert ids["cut"] not in by_message
    assert kto.skipped == {"duplicate row": 1, "a preferred answer that was cut off": 1}


def test_dpo_pairs_from_regenerations_and_comparisons(world):
    store, ids, img = world["store"], world["ids"], world["img"]
    dpo = prefs.dpo_rows(store)
    text = lambda key: store.message(ids[key])["text"]  # noqa: E731
    assert [(p["chosen_id"], p["rejected_id"], p["source"]) for p in dpo.provenance] == [
        (ids["r2"], ids["r1"], "siblings"), (ids["r2"], ids["r3"], "siblings"), (ids["b1"], ids["b2"], "compare")]
    assert dpo.rows[0] == {"images": [str(img[3].path)], "prompt": [user("Is there a red square?", 1)],
                           "chosen": [assistant(text("r2"))], "rejected": [assistant(text("r1"))]}
    assert dpo.rows[2]["chosen"] == [assistant(text("b1"))] and dpo.rows[2]["rejected"] == [assistant(text("b2"))]
    # The tie gives no pair.
    assert not any({p["chosen_id"], p["rejected_id"]} & {ids["t1"], ids["t2"]} for p in dpo.provenance)


def test_sft_rows_are_the_liked_complete_answers(world):
    sft = prefs.sft_rows(world["store"])
    ids = world["ids"]
    assert [p["message_id"] for p in sft.provenance] == [ids["a1"], ids["a2"], ids["r2"]]
    assert all(list(row) == ["images", "prompt", "completion"] for row in sft)
    assert sft.rows[1] == {"images": [], "prompt": [user("Hello!")], "completion": [assistant(HELLO_ANSWER)]}


def test_export_files(world, exported):
    import datasets

    out, summaries = exported
    manifest = json.loads((out / "export.json").read_text())
    assert set(manifest["formats"]) == {"kto", "dpo", "sft"}
    assert (summaries["kto"]["rows"], summaries["dpo"]["rows"], summaries["sft"]["rows"]) == (5, 3, 3)
    assert summaries["kto"]["images"] == 4 and summaries["kto"]["labels"] == {"up": 3, "down": 2}
    # JSONL: exactly TRL's columns, images as relative paths to copies named by sha.
    lines = [json.loads(line) for line in (out / "kto.jsonl").read_text().splitlines()]
    assert lines[2]["images"] == [f"images/{world['img'][1].sha256}.png", f"images/{world['img'][2].sha256}.png"]
    assert all((out / p).read_bytes() == world["img"][int(i)].path.read_bytes()
               for i, p in [(1, lines[2]["images"][0]), (2, lines[2]["images"][1])])
    kto = prefs.kto_rows(world["store"])
    assert [dict(r, images=[]) for r in lines] == [dict(r, images=[]) for r in kto.rows]
    provenance = [json.loads(line) for line in (out / "kto.provenance.jsonl").read_text().splitlines()]
    assert provenance == kto.provenance
    # Parquet: the one documented load call gives the same rows with images decoded to PIL, also for [] rows.
    ds = datasets.load_dataset("parquet", data_files=str(out / "kto.parquet"), split="train")
    assert ds.column_names == ["images", "prompt", "completion", "label"] and len(ds) == 5
    assert ds[1]["images"] == [] and ds[1]["prompt"] == [user("Hello!")]
    decoded = ds[2]["images"]
    assert [im.size for im in decoded] == [(64, 64), (64, 64)]
    assert decoded[0].tobytes() == load_image(world["img"][1].path).tobytes()
    assert [dict(r, images=[]) for r in ds] == [dict(r, images=[]) for r in kto.rows]


def test_completion_renders_as_generation_produces_it(world, exported):
    """TRL's completion = rendered(prompt+answer) - rendered(prompt): ' ' + answer + '<end_of_utterance>\\n',
    the tokens the model generates after 'Assistant:' (replies are stored stripped)."""
    import datasets
    from transformers import AutoProcessor
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    processor = AutoProcessor.from_pretrained(config.DEMO_MODEL_DIR)
    out, _ = exported
    row = datasets.load_dataset("parquet", data_files=str(out / "kto.parquet"), split="train")[2]
    example = {"prompt": prepare_multimodal_messages(row["prompt"], images=row["images"]),
               "completion": prepare_multimodal_messages(row["completion"]), "label": row["label"]}
    rendered = apply_chat_template(example, processor)
    stored = world["store"].message(world["ids"]["a32"])["text"]
    assert rendered["prompt"].endswith("<end_of_utterance>\nUser:<image>Describe the image.<end_of_utterance>\n"
                                       "Assistant:")
    assert rendered["completion"] == " " + stored.strip() + "<end_of_utterance>\n"


def _train_one_step(fmt, path, tmp_path):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import trl

    dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    processor = AutoProcessor.from_pretrained(config.DEMO_MODEL_DIR)
    model = AutoModelForImageTextToText.from_pretrained(config.DEMO_MODEL_DIR)
    torch.manual_seed(0)
    common = dict(output_dir=str(tmp_path / fmt), max_steps=1, per_device_train_batch_size=len(dataset),
                  learning_rate=1e-3, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
                  gradient_checkpointing=False, max_length=512, dataloader_num_workers=0)
    Config, Trainer = {"kto": (trl.KTOConfig, trl.KTOTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
                       "sft": (trl.SFTConfig, trl.SFTTrainer)}[fmt]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)", lora_dropout=0.0)
    trainer = Trainer(model=model, args=Config(**common), train_dataset=dataset, processing_class=processor,
                      peft_config=lora)
    lora_params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora_params and all("text_model" in n for n in lora_params)  # the vision tower is left alone
    result = trainer.train()
    return trainer, result, lora_params


def _trained_tokens(trainer, dataset):
    """What the trainer's own collator puts under the loss, decoded row by row."""
    batch = trainer.data_collator([dict(row) for row in dataset])
    mask = batch["completion_mask"] if "completion_mask" in batch else (batch["labels"] != -100).long()
    tokenizer = trainer.processing_class.tokenizer
    return [tokenizer.decode(ids[m.bool()]) for ids, m in zip(batch["input_ids"], mask)], batch


@pytest.mark.parametrize("fmt", prefs.FORMATS)
def test_one_trl_step_on_each_exported_file(fmt, world, exported, tmp_path):
    import datasets

    out, summaries = exported
    # One batch holds every row: rows with 0, 1 and 2 images together (KTO also needs a batch > 1 for its KL term).
    trainer, result, before = _train_one_step(fmt, out / f"{fmt}.parquet", tmp_path)
    assert trainer.state.global_step == 1
    assert math.isfinite(result.training_loss)
    after = dict(trainer.model.named_parameters())
    assert any(not after[n].detach().equal(p) for n, p in before.items() if "lora_B" in n)
    # The loss covers exactly " " + answer + "<end_of_utterance>\n" of each row (DPO: chosen rows, then rejected).
    dataset = datasets.load_dataset("parquet", data_files=str(out / f"{fmt}.parquet"), split="train")
    trained, batch = _trained_tokens(trainer, dataset)
    keys = ["chosen", "rejected"] if fmt == "dpo" else ["completion"]
    assert trained == [" " + row[key][0]["content"][0]["text"] + "<end_of_utterance>\n"
                       for key in keys for row in dataset]
    assert batch["pixel_values"].shape[1] == max(len(row["images"]) for row in dataset)
    if fmt != "sft":  # the completion was not truncated away: its log-probability is really there
        assert trainer.state.log_history[0]["logps/chosen"] < 0


def test_text_only_feedback_trains_and_empty_formats_write_no_parquet(tmp_path):
    """Only greetings rated (no image anywhere): still a vision dataset for TRL, and KTO trains on it.
    No preference pairs: dpo has no rows, and no parquet (datasets cannot load one without rows)."""
    store = Store(tmp_path / "data")
    carol = store.ensure_user("carol")
    for question, vote in [("Hello!", "up"), ("Hi", "down"), ("What can you do?", "up")]:
        conversation = store.create_conversation(carol, question)
        store.set_vote(carol, answer(store, conversation, ask(store, conversation, None, question), HELLO_ANSWER),
                       vote)
    out = tmp_path / "out"
    summaries = {fmt: export.export(store, fmt, out) for fmt in prefs.FORMATS}
    assert summaries["dpo"]["rows"] == 0 and summaries["dpo"]["parquet"] is None and not (out / "dpo.parquet").exists()
    assert (out / "dpo.jsonl").read_text() == ""
    assert summaries["kto"]["rows"] == 3 and summaries["kto"]["images"] == 0
    trainer, result, _ = _train_one_step("kto", out / "kto.parquet", tmp_path)
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)


def test_cli_export(world, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="python -m chatapp")
    export.add_parser(parser.add_subparsers(dest="command"))
    data_dir = world["store"].data_dir
    args = parser.parse_args(["export", "--out", str(tmp_path / "ex"), "--data-dir", str(data_dir)])
    assert (args.command, args.format) == ("export", "all")
    assert export.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["kto", "dpo", "sft"]
    assert lines[0].startswith(f"kto: 5 rows, 4 images -> {tmp_path / 'ex' / 'kto.parquet'}")
    # Exporting again into an export folder replaces its files.
    again = parser.parse_args(["export", "--format", "dpo", "--out", str(tmp_path / "ex"), "--data-dir", str(data_dir)])
    assert export.run(again) == 0
    assert capsys.readouterr().out.startswith("dpo: 3 rows, 2 images")

    # A non-empty folder that is not an export, and a data dir with no database: one line, exit 2.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for argv, message in [(["--out", str(tmp_path / "mine"), "--data-dir", str(data_dir)], "is not an export folder"),
                          (["--out", str(tmp_path / "new"), "--data-dir", str(tmp_path / "nodata")],
                           "no feedback database")]:
        assert export.run(parser.parse_args(["export", *argv])) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "nodata").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--format", "ppo", "--out", str(tmp_path / "x")])
    help_text = export.add_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "--format" in help_text and "--out" in help_text and "load_dataset" in help_text
