"""A random-weight stand-in for SmolVLM-256M-Instruct: the real model's dimensions and processor
settings, made offline, for measuring speed and memory (benchmarks, the SmolVLM-sized tests).

Invariants:
- Built only from local code and a seed: no hub access.
- It is saved like a hub checkpoint (bfloat16 safetensors plus processor), into a `.partial`
  folder renamed into place, so a folder with config.json is a complete model and is reused;
  a folder built by an older version of this module (no matching BUILD_MARKER) is rebuilt.
- Its tokenizer covers every one of the model's 49,280 ids (the real head size, which decode speed
  depends on): the shapes-world BPE plus placeholder words, so any reply a random model produces
  decodes to text and a conversation can go on for many turns.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from chatapp.demo.architecture import (SPECIAL_TOKENS, build_processor, build_tokenizer, model_config,
                                       set_generation_defaults)


# SmolVLM-256M-Instruct's real dimensions (its config.json): what matters for speed and memory.
SMOLVLM_256M_DIMS = dict(
    text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_intermediate=1536,
    vision_hidden=768, vision_layers=12, vision_heads=12, vision_intermediate=3072,
    image_size=512, patch_size=16, scale_factor=4, max_context=8192, vocab_size=49280,
)
BUILD_MARKER = "chatapp-build.json"
BUILD_VERSION = 2  # 2: the tokenizer covers the whole vocabulary
BYTE_LEVEL_SPACE = "\u0120"  # how the byte-level alphabet writes a space: "Ġ"
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def placeholder_word(index: int) -> str:
    """A pronounceable word for placeholder token `index`, unique per index: two syllables for the
    first 70**2 indexes, three after."""
    n = len(_SYLLABLES)
    if index < n * n:
        return _SYLLABLES[index // n] + _SYLLABLES[index % n]
    index -= n * n
    return _SYLLABLES[index // (n * n) % n] + _SYLLABLES[index // n % n] + _SYLLABLES[index % n]


def full_vocabulary_tokenizer(tokenizer, vocab_size: int):
    """`tokenizer` with placeholder entries for ids len(tokenizer)..vocab_size-1. They are ordinary
    BPE vocabulary entries (a space then a placeholder word, in the byte-level alphabet) that no merge
    produces: encoding any text is unchanged, and every id decodes to text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    index = 0
    for token_id in range(len(vocab), vocab_size):
        while BYTE_LEVEL_SPACE + placeholder_word(index) in vocab:
            index += 1
        vocab[BYTE_LEVEL_SPACE + placeholder_word(index)] = token_id
        index += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token, unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=SMOLVLM_256M_DIMS["max_context"], padding_side=tokenizer.padding_side,
    )


def _is_current_build(out_dir: Path) -> bool:
    try:
        return json.loads((out_dir / BUILD_MARKER).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_smolvlm_sized_random(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Idefics3 model with SmolVLM-256M-Instruct's dimensions and processor
    settings (512 px frames, 64 tokens each, image splitting), saved like a hub checkpoint.
    It says nothing useful; it loads and runs exactly like the real one, at the same cost."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        if _is_current_build(out_dir):
            return out_dir
        shutil.rmtree(out_dir)  # an older build (its tokenizer decoded almost every id to ''): a benchmark cache
    torch.manual_seed(seed)
    tokenizer = full_vocabulary_tokenizer(build_tokenizer(random.Random(seed), 640), SMOLVLM_256M_DIMS["vocab_size"])
    processor = build_processor(tokenizer, image_size=512, image_seq_len=64, do_image_splitting=True,
                                max_image_size=512)
    model = Idefics3ForConditionalGeneration(model_config(tokenizer, **SMOLVLM_256M_DIMS))
    set_generation_defaults(model, tokenizer)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # stored in bf16, as on the hub
    processor.save_pretrained(tmp)
    (tmp / BUILD_MARKER).write_text(json.dumps({"version": BUILD_VERSION, "seed": seed}))
    tmp.rename(out_dir)
    return out_dir

