"""A data-parallel LoRA SFT run with TRL, launched by `accelerate launch` (docs/learning.md, "Multi-GPU
training"). On a CPU it runs as N gloo processes; on GPUs, one process per GPU.

    accelerate launch --num_processes 2 [--cpu] bench/ddp_sft.py --out DIR [--steps 4]

Every process loads the demo model (or --model), builds the same shapes rows, and TRL's SFTTrainer
trains one LoRA over them, each process on its shard of every batch, with gradients averaged across
processes after each step. Each process writes `rank<R>.json`: the world size it saw, its losses, and a
checksum of its LoRA weights after training. In data-parallel training those checksums are equal
(every process applied the same averaged update), which tests/test_openai_backend.py's opt-in check
asserts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from chatapp.demo import shapes
    from chatapp.serving.loading import load_model

    model, processor = load_model(args.model, device="cpu" if not torch.cuda.is_available() else None)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        scene = shapes.random_scene(rng)
        rows.append({"images": [shapes.render(scene)],
                     "prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": "How many shapes are there?"}]}],
                     "completion": [{"role": "assistant", "content": [{"type": "text",
                                                                       "text": f" {len(scene.shapes)}."}]}]})
    out = Path(args.out)
    config = SFTConfig(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=2,
                       learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                       use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, max_length=None,
                       seed=0, data_seed=0, ddp_find_unused_parameters=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*text_model.*\.(q_proj|v_proj)")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=lora)
    trainer.train()
    state = trainer.accelerator.state
    digest = hashlib.sha256()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in sorted(unwrapped.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode() + param.detach().float().cpu().numpy().tobytes())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{state.process_index}.json").write_text(json.dumps(
        {"world_size": state.num_processes, "backend": str(state.backend), "losses": losses,
         "lora_sha256": digest.hexdigest(), "steps": trainer.state.global_step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
