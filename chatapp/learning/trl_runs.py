"""One TRL run (KTO, DPO or SFT) on a LoRA, with the run's progress written to the store, and the
plain recipes (`--method kto|dpo|sft`) built on it.

Invariants:
- Only LoRA weights train, and only on the language model (`lora_config`: the vision tower is never
  targeted).
- Reference model: with `--from base` every method trains a fresh LoRA and TRL's reference is the
  base model with adapters disabled (no second copy). With `--from active` the new LoRA starts from
  the live adapter's weights; for KTO/DPO the reference is then the live adapter (a frozen copy of it).
- A run leaves the model as it found it apart from its adapters: TRL patches the base model's
  `forward` on the instance, and `train_trl` puts the original back, however the run ends.
- SFT for a sampling temperature T takes its loss on logits / T, so the rows become likely at the
  temperature users chat at, not only at 1.
- The CPU patches change memory, never results: labelled positions alone are scored (the same
  log-probabilities, tests/test_trainer.py), the frozen vision tower is not back-propagated through,
  and freed activations go back to the OS between steps.
- Progress (phase, step, total, loss, rewards, ETA) is written to the run's row in the store,
  at most every 0.5 s except for logged points.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from chatapp.feedback import prefs
from chatapp.learning.data import Data, dataset
from chatapp.learning.settings import CHECKPOINTING_MIN_PARAMS, TrainSettings


class Progress:
    """Writes a run's progress to the store (throttled) and keeps an ETA per phase."""

    def __init__(self, store, run_id: int, log=print):
        self.store, self.run_id, self.log = store, run_id, log
        self.phase, self.total, self.started, self.last_write = "", 0, time.monotonic(), 0.0

    def start(self, phase: str, total: int) -> None:
        self.phase, self.total, self.started = phase, total, time.monotonic()
        self.log(f"train: {phase} ({total} steps)" if total else f"train: {phase}")
        self.store.update_run(self.run_id, phase=phase, step=0, total_steps=total, eta_s=None)

    def step(self, step: int, loss: float | None = None, points: dict | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and not points and now - self.last_write < 0.5:
            return
        self.last_write = now
        elapsed = now - self.started
        eta = elapsed / step * (self.total - step) if step and self.total else None
        fields = {"phase": self.phase, "step": step, "total_steps": self.total, "eta_s": eta}
        if loss is not None:
            fields["loss"] = loss
        self.store.update_run(self.run_id, points=points, **fields)


def _callback(progress: Progress):
    from transformers import TrainerCallback

    class StoreProgress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress.step(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            points = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and (
                k == "loss" or k.startswith("rewards/") or k == "kl")}
            progress.step(state.global_step, loss=logs.get("loss"), points=points or None, force=True)

    return StoreProgress()


def lora_config(settings: TrainSettings, modules: str = "q_proj|k_proj|v_proj|o_proj"):
    from peft import LoraConfig

    modules = modules + ("|gate_proj|up_proj|down_proj" if settings.lora_mlp else "")
    # the language model only: a bare list of names would also hit the vision tower
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=rf".*text_model.*\.({modules})", task_type="CAUSAL_LM")


def use_gradient_checkpointing(settings: TrainSettings, model) -> bool:
    if settings.gradient_checkpointing != "auto":
        return settings.gradient_checkpointing == "on"
    return sum(p.numel() for p in model.parameters()) >= CHECKPOINTING_MIN_PARAMS


def _common_args(settings: TrainSettings, out: str, lr: float, epochs: int, checkpointing: bool = False) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    args = dict(output_dir=out, per_device_train_batch_size=settings.batch_size, learning_rate=lr,
                gradient_accumulation_steps=settings.grad_accum,
                num_train_epochs=epochs, lr_scheduler_type=settings.lr_schedule, warmup_steps=0, report_to=[],
                logging_steps=1 if settings.max_steps and settings.max_steps <= 20 else 5, save_strategy="no",
                gradient_checkpointing=checkpointing, max_length=settings.max_length,
                dataloader_num_workers=0, seed=settings.seed, use_cpu=not cuda, bf16=cuda, disable_tqdm=False,
                remove_unused_columns=False)
    if checkpointing:  # the non-reentrant kind works with a frozen base and LoRA without input-grad hooks
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if settings.max_steps:
        args["max_steps"] = settings.max_steps
    return args


def train_trl(kind: str, model, processor, rows: list[dict], settings: TrainSettings, progress: Progress,
              lr: float, epochs: int, peft_config=None, extra: dict | None = None, schedule: str | None = None,
              temperature: float = 1.0):
    """One TRL run. `temperature` (SFT only): the loss is taken on logits / temperature, so the rows
    become likely when answers are sampled at that temperature, not only at 1."""
    import trl

    config_cls, trainer_cls = {"kto": (trl.KTOConfig, trl.KTOTrainer), "dpo": (trl.DPOConfig, trl.DPOTrainer),
                               "sft": (trl.SFTConfig, trl.SFTTrainer)}[kind]
    with tempfile.TemporaryDirectory(prefix="chatapp-train-") as out:
        args = _common_args(settings, out, lr, epochs, use_gradient_checkpointing(settings, model))
        if schedule:
            args["lr_scheduler_type"] = schedule
        args.update(extra or {})
        saving = args["gradient_checkpointing"]  # the memory-saving mode of models of real size
        callbacks = [_callback(progress)] + ([_frozen_inputs_callback(), _return_freed_memory_callback()]
                                             if saving else [])
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        own_forward = base.__dict__.get("forward")  # TRL patches the instance's forward; put it back after
        trainer = trainer_cls(model=model, args=config_cls(**args), train_dataset=dataset(rows),
                              processing_class=processor, peft_config=peft_config, callbacks=callbacks)
        if kind == "sft" and temperature != 1.0:
            # the trainer's fused LM head, again, dividing the logits by the temperature
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(base, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
        progress.start(progress.phase, trainer.state.max_steps or _steps(len(rows), settings, epochs))
        try:
            with _score_labelled_positions_only():
                trainer.train()
        finally:
            if own_forward is None:
                base.__dict__.pop("forward", None)
            else:
                base.forward = own_forward
        progress.step(trainer.state.global_step, force=True)
        return trainer.model


def _frozen_inputs_callback():
    """With gradient checkpointing, TRL, peft and transformers each make the input embeddings of every
    sub-model require grad, the vision tower's patch embeddings too, so autograd records and then
    back-propagates through the whole frozen vision tower (17 tiles a SmolVLM image) for nothing.
    Non-reentrant checkpointing needs no such hook (the LoRA weights inside each block require grad),
    so they are removed once training begins, after the trainer has enabled checkpointing. They are
    found by name: each call of `enable_input_require_grads` forgets the previous call's handles
    (`disable_input_require_grads` left one set in place, measured)."""
    from transformers import TrainerCallback

    class FrozenInputs(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for module in model.modules():
                for key, hook in list(module._forward_hooks.items()):
                    if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                        del module._forward_hooks[key]

    return FrozenInputs()


@contextlib.contextmanager
def _score_labelled_positions_only():
    """TRL's fused LM head projects, in tiles, only the positions that have a label on CUDA, but every
    position elsewhere (to keep tile shapes fixed for compilers such as Neuron's). On the CPU that means
    a SmolVLM image row's ~1,140 prompt positions are projected onto the 49k-token vocabulary, forward
    and backward, for the ~10 completion tokens that have labels: ~1 GB of a step's peak memory
    (bench/training.py). Eager CPU kernels do not recompile, so labelled positions alone are scored
    there too; the log-probabilities are the same (tests/test_trainer.py)."""
    from trl.trainer import utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:  # another TRL layout: leave it alone
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _return_freed_memory_callback():
    """A step of a real-size model frees ~1 GB of activations that glibc keeps in its heap rather than
    giving back, so the next step's peak (the vision tower's forward) lands on top of it: measured
    3.2 GB instead of 2.5 GB on the SmolVLM-sized model. `malloc_trim` after each step returns it."""
    import ctypes
    import ctypes.util
    from transformers import TrainerCallback

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)  # glibc only: elsewhere a no-op

    class ReturnFreedMemory(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if trim is not None:
                trim(0)

        on_substep_end = on_step_end  # between gradient-accumulation micro-batches too

    return ReturnFreedMemory()


def _steps(rows: int, settings: TrainSettings, epochs: int) -> int:
    if settings.max_steps:
        return settings.max_steps
    return max(1, -(-rows // (settings.batch_size * settings.grad_accum))) * epochs


def rename_adapter(model, old: str, new: str) -> None:
    """Copy adapter `old` under the name `new` (peft has no rename) and drop `old`."""
    if old == new:
        return
    with tempfile.TemporaryDirectory(prefix="chatapp-adapter-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[old])
        folder = Path(tmp) / old if (Path(tmp) / old).is_dir() else Path(tmp)
        model.load_adapter(str(folder), adapter_name=new)
    model.set_adapter(new)
    model.delete_adapter(old)


def train_plain(method: str, base, processor, data: Data, settings: TrainSettings, progress: Progress, live_path,
                lr: float):
    """`--method kto|dpo|sft`: one TRL run on the votes, the pairs or the liked answers; the trained
    adapter is named "candidate"."""
    from peft import PeftModel

    rows = {"kto": data.kto_train, "dpo": data.dpo_train, "sft": data.sft_train}[method].rows
    extra = {"beta": settings.beta} if method in ("kto", "dpo") else {}
    temperature = data.temperature if method == "sft" else 1.0
    if method == "kto":
        desirable, undesirable = prefs.kto_weights(data.kto_train)
        extra.update(desirable_weight=desirable, undesirable_weight=undesirable)
    progress.phase = f"training ({method})"
    if live_path and settings.start_from == "active":
        # TRL looks for peft's default adapter name; it becomes "candidate" after training
        model = PeftModel.from_pretrained(base, str(live_path), is_trainable=True)
        model = train_trl(method, model, processor, rows, settings, progress, lr, settings.epochs, extra=extra,
                          temperature=temperature)
    else:
        model = train_trl(method, base, processor, rows, settings, progress, lr, settings.epochs,
                          peft_config=lora_config(settings), extra=extra, temperature=temperature)
    rename_adapter(model, model.active_adapter, "candidate")
    return model
