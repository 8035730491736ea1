"""A random-weight stand-in for SmolVLM-256M-Instruct: the real model's dimensions and processor
settings, made offline, for measuring speed and memory (benchmarks, the SmolVLM-sized tests).

Invariants:
- Built only from local code and a seed: no hub access.
- It is saved like a hub checkpoint (bfloat16 safetensors plus processor), into a `.partial`
  folder renamed into place, so a folder with config.json is a complete model and is reused.
"""
from __future__ import annotations

import random
from pathlib import Path

from chatapp.demo.architecture import build_processor, build_tokenizer, model_config, set_generation_defaults


# SmolVLM-256M-Instruct's real dimensions (its config.json): what matters for speed and memory.
SMOLVLM_256M_DIMS = dict(
    text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_intermediate=1536,
    vision_hidden=768, vision_layers=12, vision_heads=12, vision_intermediate=3072,
    image_size=512, patch_size=16, scale_factor=4, max_context=8192, vocab_size=49280,
)


def build_smolvlm_sized_random(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Idefics3 model with SmolVLM-256M-Instruct's dimensions and processor
    settings (512 px frames, 64 tokens each, image splitting), saved like a hub checkpoint.
    It says nothing useful; it loads and runs exactly like the real one, at the same cost."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(random.Random(seed), 640)
    processor = build_processor(tokenizer, image_size=512, image_seq_len=64, do_image_splitting=True,
                                max_image_size=512)
    model = Idefics3ForConditionalGeneration(model_config(tokenizer, **SMOLVLM_256M_DIMS))
    set_generation_defaults(model, tokenizer)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # stored in bf16, as on the hub
    processor.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir

