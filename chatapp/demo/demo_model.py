"""Building the offline demo model: a tiny Idefics3 (SmolVLM's classes) trained from scratch on the
shapes world. Its parts (template, tokenizer, processor, config) are in `architecture`; measuring
it is `evaluation`.

Invariants:
- Built only from local code and a seed: no hub access. The same seed gives the same data,
  tokenizer and initial weights (training on CPU is deterministic up to thread scheduling).
- It is saved with `save_pretrained` as safetensors plus a processor, so it loads through the
  same `AutoModelForImageTextToText` / `AutoProcessor` path as a real hub model.
- Training targets are exactly what generation produces: `Assistant:` is followed by
  `" " + answer + "<end_of_utterance>\\n"`; only those tokens carry loss.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from chatapp.demo import shapes
from chatapp.demo.architecture import (DEMO_IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR, SYSTEM_PROMPTS, build_processor,
                                       build_tokenizer, chat_messages, model_config, set_generation_defaults)

# Counting shapes of one kind ("two circles") is learned last: ask about it more often.
TRAIN_WEIGHTS = {"color": 1.0, "count": 1.2, "shapes": 1.3, "exists": 1.3, "describe": 1.5}


@dataclass
class BuildConfig:
    seed: int = 0
    vocab_size: int = 640
    text_hidden: int = 128
    text_layers: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    # Stage 1: the vision tower alone learns what is where (dense labels per image cell).
    vision_images: int = 4000
    vision_steps: int = 2400
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    # Stage 2: the whole model learns to answer.
    train_images: int = 6000
    questions_per_image: int = 3
    batch_size: int = 32
    lr: float = 1.5e-3
    vision_lr_scale: float = 0.25  # the pretrained vision tower moves slowly: it already sees
    max_steps: int = 2800
    decay_from: float = 0.6  # constant learning rate until this share of the steps, then cosine decay


# ---------------------------------------------------------------- training data

def conversation_messages(examples: list[shapes.Example], system: str = "") -> list[dict]:
    """A multi-turn chat about one image: the image comes with the first question only."""
    messages = chat_messages(examples[0], system)
    for i, ex in enumerate(examples):
        if i:
            messages.append({"role": "user", "content": [{"type": "text", "text": ex.question}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": ex.answer}]})
    return messages


def encode_conversation(processor, examples: list[shapes.Example], image, system: str = ""):
    """input_ids and labels for a conversation; only the assistant's answers carry loss, each as
    `" " + answer + "<end_of_utterance>\n"`, exactly the tokens generation produces after `Assistant:`."""
    import torch

    text = processor.apply_chat_template(conversation_messages(examples, system))
    encoded = processor(text=[text], images=[[image]] if image is not None else None, return_tensors="pt")
    ids = encoded["input_ids"][0]
    labels = torch.full_like(ids, -100)
    tokenize = lambda t: processor.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    marker = tokenize("Assistant:")
    seq, pos = ids.tolist(), 0
    for ex in examples:
        target = tokenize(" " + ex.answer + "<end_of_utterance>\n")
        pattern = marker + target
        while seq[pos:pos + len(pattern)] != pattern:
            pos += 1
            if pos + len(pattern) > len(seq):
                raise AssertionError(f"answer tokens not found in the encoded conversation: {ex.answer!r}")
        start = pos + len(marker)
        labels[start:start + len(target)] = ids[start:start + len(target)]
        pos = start + len(target)
    return {"input_ids": ids, "labels": labels, "pixel_values": encoded.get("pixel_values")}


def encode_example(processor, example: shapes.Example, image, system: str = ""):
    return encode_conversation(processor, [example], image, system)


def make_training_set(processor, rng: random.Random, n_images: int, per_image: int, progress=None,
                      multi_turn_share: float = 0.3):
    """Encode once: each image gets `per_image` questions, asked one per conversation or, for a
    share of images, together as one multi-turn chat; plus image-less capability turns."""
    rows = []
    image_types = [q for q in shapes.QUESTION_TYPES if q != "capabilities"]
    weights = [TRAIN_WEIGHTS[q] for q in image_types]
    for i in range(n_images):
        scene = shapes.random_scene(rng)
        image = shapes.render(scene)
        examples = [shapes.make_example(rng, q, scene) for q in rng.choices(image_types, weights, k=per_image)]
        groups = [examples] if rng.random() < multi_turn_share else [[ex] for ex in examples]
        pixels = None
        for group in groups:
            row = encode_conversation(processor, group, image, rng.choice(SYSTEM_PROMPTS))
            pixels = row["pixel_values"] if pixels is None else pixels
            row["pixel_values"] = pixels  # one tensor per image, shared by its rows
            rows.append(row)
        if i % 10 == 0:  # capability questions need no image; keep them a small share
            ex = shapes.random_example(rng, "capabilities")
            rows.append(encode_example(processor, ex, None, rng.choice(SYSTEM_PROMPTS)))
        if progress:
            progress.update(1)
    return rows


def collate(rows, pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    with_pixels = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
    if with_pixels:
        if len(with_pixels) != len(rows):
            raise ValueError("collate needs rows that all have images or none")
        batch["pixel_values"] = torch.cat(with_pixels, dim=0)
    return batch


def batches(rows, batch_size: int, rng: random.Random):
    """Shuffled batches that never mix rows with and without images (the model needs one or the other)."""
    with_img = [r for r in rows if r["pixel_values"] is not None]
    without = [r for r in rows if r["pixel_values"] is None]
    while True:
        rng.shuffle(with_img)
        rng.shuffle(without)
        chunks = [with_img[i:i + batch_size] for i in range(0, len(with_img), batch_size)]
        chunks += [without[i:i + batch_size] for i in range(0, len(without), batch_size)]
        rng.shuffle(chunks)
        yield from chunks


# ---------------------------------------------------------------- stage 1: vision pretraining

# Why a stage 1: trained only through answers, a tiny ViT from scratch tells circles from squares
# barely above chance after 10 CPU minutes (measured: ~30-45% on "What shapes do you see?").
# Dense labels (which shape/color pairs cover each of the 16 image-token cells) teach it in
# about a minute; the answer training then starts from a vision tower that sees.
CELL_COMBOS = [(k, c) for k in shapes.SHAPES for c in shapes.COLORS]


def cell_labels(scene: shapes.Scene, grid: int) -> "np.ndarray":
    """(grid*grid, 12) multi-hot: which (shape, color) pairs cover at least 8% of each cell."""
    import numpy as np

    labels = np.zeros((grid * grid, len(CELL_COMBOS)), dtype=np.float32)
    cell = shapes.IMAGE_SIZE // grid
    for s in scene.shapes:
        alone = shapes.render(shapes.Scene((shapes.Shape(s.kind, "red", s.x, s.y, s.r),)))
        covered = np.asarray(alone)[:, :, 1] < 128  # red paint has a low green channel; white is 255
        share = covered.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(-1)
        labels[share > 0.08, CELL_COMBOS.index((s.kind, s.color))] = 1
    return labels


def pretrain_vision(model, processor, rng: random.Random, cfg: "BuildConfig", progress) -> float:
    """Train the vision tower (and a throwaway linear head on its image tokens) on cell labels."""
    import numpy as np
    import torch

    grid = DEMO_IMAGE_SIZE // PATCH_SIZE // SCALE_FACTOR
    pixels, labels = [], []
    for _ in range(cfg.vision_images):
        scene = shapes.random_scene(rng)
        pixels.append(processor.image_processor(images=[[shapes.render(scene)]], return_tensors="pt")["pixel_values"][0])
        labels.append(cell_labels(scene, grid))
    pixels, labels = torch.cat(pixels), torch.tensor(np.stack(labels))
    vision, connector = model.model.vision_model, model.model.connector
    head = torch.nn.Linear(model.config.vision_config.hidden_size * SCALE_FACTOR ** 2, len(CELL_COMBOS))
    optimizer = torch.optim.AdamW(list(vision.parameters()) + list(head.parameters()), lr=cfg.vision_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss = torch.tensor(0.0)
    for _ in range(cfg.vision_steps):
        idx = torch.randint(0, len(pixels), (cfg.vision_batch_size,), generator=generator)
        features = connector.pixel_shuffle(vision(pixel_values=pixels[idx]).last_hidden_state, SCALE_FACTOR)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(features), labels[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        progress.update(1)
    return loss.item()


# ---------------------------------------------------------------- build

def _demo_config(tokenizer, cfg: BuildConfig):
    return model_config(
        tokenizer, text_hidden=cfg.text_hidden, text_layers=cfg.text_layers, text_heads=4, text_kv_heads=2,
        text_intermediate=cfg.text_hidden * 3, vision_hidden=cfg.vision_hidden, vision_layers=cfg.vision_layers,
        vision_heads=2, vision_intermediate=cfg.vision_hidden * 4, image_size=DEMO_IMAGE_SIZE,
        patch_size=PATCH_SIZE, scale_factor=SCALE_FACTOR,
    )


def build(out_dir: Path, cfg: BuildConfig = BuildConfig(), log=print) -> dict:
    """Train the demo model from scratch and save model + processor to `out_dir`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import Idefics3ForConditionalGeneration

    started = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer(rng, cfg.vocab_size)
    processor = build_processor(tokenizer)
    model = Idefics3ForConditionalGeneration(_demo_config(tokenizer, cfg))
    set_generation_defaults(model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"demo model: {n_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}")

    model.train()
    with tqdm(total=cfg.vision_steps, desc="stage 1: vision", unit="step") as bar:
        vision_loss = pretrain_vision(model, processor, rng, cfg, bar)
    with tqdm(total=cfg.train_images, desc="encoding images", unit="img") as bar:
        rows = make_training_set(processor, rng, cfg.train_images, cfg.questions_per_image, bar)

    vision = [p for n, p in model.named_parameters() if "vision_model" in n or "connector" in n]
    text = [p for n, p in model.named_parameters() if not ("vision_model" in n or "connector" in n)]
    optimizer = torch.optim.AdamW([{"params": text, "lr": cfg.lr},
                                   {"params": vision, "lr": cfg.lr * cfg.vision_lr_scale}],
                                  weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.max_steps // 20)
    decay_start = int(cfg.max_steps * cfg.decay_from)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    stream = batches(rows, cfg.batch_size, rng)
    ema = None
    with tqdm(total=cfg.max_steps, desc="stage 2: answers", unit="step") as bar:
        for step in range(cfg.max_steps):
            batch = collate(next(stream), tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.set_postfix(loss=f"{ema:.3f}")
            bar.update(1)
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    info = {"seed": cfg.seed, "parameters": n_params, "steps": cfg.max_steps, "final_loss_ema": ema,
            "vision_pretraining_loss": vision_loss,
            "train_rows": len(rows), "seconds": round(time.time() - started, 1),
            "config": cfg.__dict__}
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2))
    log(f"saved to {out_dir} in {info['seconds']} s (loss {ema:.3f})")
    return info

