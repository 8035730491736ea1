"""Turn the store's feedback into a LoRA adapter, check it with the gate, publish it in the registry.

    store -> prefs (rows, held-out split, per-user cap) -> TRL -> gate -> registry

Methods (`--method`):
- `rs` (the default `auto` when there are thumbs): rejection sampling. The votes train a KTO
  *scorer* (a LoRA whose implicit reward, log p_scorer - log p_base, ranks answers like the voters
  did); the policy samples `best_of` answers to each unvoted prompt users sent; the best answer by
  the scorer is kept when its reward is above the midpoint between liked and disliked training
  answers; a LoRA is trained (TRL SFT) on the kept answers. With `rs_rounds` = 2 (the default) a
  second round samples from the first round's candidate, whose answers are mostly in the liked
  style already, so the kept set is purer, and trains fresh LoRAs on it for `epochs` and for each
  of `rs_extra_epochs` (8, 12); the gate publishes the best that passes. The candidates are trained
  for the temperature users chat at (the voted answers' own, from their generation records): their
  SFT loss is taken on logits / T, and the gate samples at T. A scorer that cannot rank the held-out
  votes (the gate's AUC bar) ends the run before any sampling. This moved the demo
  model's answer style where plain KTO/DPO on the same votes barely moved it or wrecked accuracy
  (see README).
- `kto`: TRL KTO on the thumbs; `dpo`: TRL DPO on preferred siblings and comparisons; `sft`: TRL SFT
  on liked answers.
Reference model: with `--from base` every method trains a fresh LoRA and TRL's reference is the base
model with adapters disabled (no second copy). With `--from active` the new LoRA starts from the
live adapter's weights; for KTO/DPO the reference is then the live adapter (a frozen copy of it).

Invariants:
- Nothing is published unless the gate promotes it or the caller asks for it; a run that raises is
  marked failed in the store and publishes nothing.
- The run's progress (phase, step, total, loss, rewards, ETA) and result are written to the store.
- Torch threads and the process priority are limited, so a chat served from the same machine stays
  responsive (default: 1 thread when the machine has 2 cores or fewer; SCHED_IDLE and nice 10).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatapp.core import config
from chatapp.feedback import prefs
from chatapp.core.errors import RequestError

METHODS = ("auto", "rs", "kto", "dpo", "sft")
DEFAULT_LR = {"rs": 2e-3, "kto": 1e-3, "dpo": 1e-3, "sft": 2e-3, "scorer": 1e-3}


class NotEnoughFeedback(RequestError):
    pass


@dataclass
class TrainSettings:
    method: str = "auto"
    start_from: str = "active"  # active | base
    max_steps: int | None = None
    epochs: int = 4
    scorer_epochs: int = 10  # a weak scorer (3 epochs) let other styles through (README table)
    learning_rate: float | None = None
    batch_size: int = 8
    grad_accum: int = 1  # batches per optimizer step: batch_size 1 x grad_accum 8 trains like 8 with 1 row's memory
    # recompute activations in the backward pass instead of keeping them: auto = on for models of
    # >= 50 M parameters, where activations are most of a run's memory (bench/training.py), off for the
    # demo model, whose activations are a few MB
    gradient_checkpointing: str = "auto"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_mlp: bool = False
    candidate_modules: str = "q_proj|k_proj|v_proj|o_proj"
    lr_schedule: str = "linear"  # the candidate's; the scorer uses a constant rate
    select: str = "mix"  # rs: among answers above the threshold, the best by log p_base + reward_weight * reward
    reward_weight: float = 0.1  # (likelihood: by log p_scorer; reward: by reward alone) -- README table
    keep: str = "midpoint"  # rs: keep the best answer when its reward is above the midpoint | liked (the liked mean)
    beta: float = 0.1
    best_of: int = 8
    rs_prompts: int = 1000
    rs_temperature: float = 0.7  # fewer wrong samples than at 1.0 for the same style shift (README table)
    rs_rounds: int = 2  # rs: rounds of sampling + SFT; round 2 samples from round 1's candidate (README table)
    # rs: the last round also trains candidates for these epoch counts on the same kept answers, and the
    # gate publishes the best that passes: no one count met the bar for every style (README table)
    rs_extra_epochs: tuple[int, ...] = (8, 12)
    # the sampling temperature the candidate is trained (rs / sft: loss on logits / T) and judged for;
    # None: the one the voted answers were sampled at (their generation records), 1 when none was sampled
    temperature: float | None = None
    max_new_tokens: int = 64
    min_rows: int = 20
    min_pairs: int = 20
    max_user_share: float = prefs.MAX_USER_SHARE
    held_out_fraction: float = prefs.HELD_OUT_FRACTION
    max_length: int = 2048
    seed: int = 0
    threads: int | None = None
    priority: str = "idle"  # idle: SCHED_IDLE + nice 10 (Linux) | nice: nice 10 only
    quantize: str | None = None  # 4bit = QLoRA, CUDA only
    publish: str = "gate"  # gate: publish, activate if promoted | always: activate anyway | never
    regression_set: str | None = None  # JSONL probe for models other than the demo model

    def candidates(self, method: str) -> dict[str, int]:
        """The adapters the last round trains, name -> epochs: "candidate" for `epochs` (the default
        one, recorded when none passes), then "candidate-eN" for each of rs's extra epoch counts."""
        extra = sorted({e for e in self.rs_extra_epochs if e != self.epochs}) if method == "rs" else []
        return {"candidate": self.epochs, **{f"candidate-e{e}": e for e in extra}}

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainSettings":
        """Bad settings get a clear error before anything is loaded or recorded."""
        def check(ok: bool, message: str):
            if not ok:
                raise RequestError(message)
        check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check(self.start_from in ("active", "base"), f"--from must be active or base, got {self.start_from!r}")
        check(self.priority in ("idle", "nice"), f"priority must be idle or nice, got {self.priority!r}")
        check(self.gradient_checkpointing in ("auto", "on", "off"),
              f"gradient checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")
        check(1 <= self.grad_accum <= 256, f"grad accum must be between 1 and 256, got {self.grad_accum}")
        check(self.publish in ("gate", "always", "never"), f"publish must be gate, always or never, got {self.publish!r}")
        check(self.max_steps is None or self.max_steps >= 1, "max steps must be at least 1")
        for name, low, high in (("epochs", 1, 100), ("batch_size", 1, 256), ("lora_r", 1, 256), ("best_of", 2, 64),
                                ("rs_prompts", 1, 100_000), ("min_rows", 1, 1_000_000), ("rs_rounds", 1, 5)):
            value = getattr(self, name)
            check(low <= value <= high, f"{name.replace('_', ' ')} must be between {low} and {high}, got {value}")
        check(all(1 <= e <= 100 for e in self.rs_extra_epochs) and len(self.rs_extra_epochs) <= 4,
              f"rs extra epochs must be at most 4 epoch counts between 1 and 100, got {list(self.rs_extra_epochs)}")
        check(0 < self.max_user_share <= 1, f"max user share must be in (0, 1], got {self.max_user_share}")
        check(self.learning_rate is None or 0 < self.learning_rate < 1,
              f"learning rate must be in (0, 1), got {self.learning_rate}")
        check(self.threads is None or self.threads >= 1, "threads must be at least 1")
        check(self.temperature is None or 0 < self.temperature <= config.TEMPERATURE_MAX,
              f"temperature must be in (0, {config.TEMPERATURE_MAX}], got {self.temperature}")
        return self


@dataclass
class RunResult:
    run_id: int
    method: str
    decision: str
    reason: str
    version: str | None
    metrics: dict = field(default_factory=dict)


def limit_resources(threads: int | None, priority: str = "idle") -> int:
    """Fewer torch threads and a lower priority than the chat; returns the thread count used.
    priority "idle" (Linux SCHED_IDLE, on top of nice 10): the run only gets CPU time the chat does
    not want. Nice alone was not enough on 2 cores: the serving process's two OpenMP threads need
    both cores at once, and a niced trainer holding one made the SmolVLM-sized model's p95
    inter-token gap 1.60x idle; under SCHED_IDLE it was 0.99x (bench/contention.py, README)."""
    import torch

    if threads is None:
        threads = 1 if (os.cpu_count() or 1) <= 2 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    if priority == "idle":
        with contextlib.suppress(OSError, AttributeError):  # not Linux: nice 10 only
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return threads


# ---------------------------------------------------------------- data

@dataclass
class Data:
    kto_train: prefs.Rows
    kto_held: prefs.Rows
    dpo_train: prefs.Rows
    dpo_held: prefs.Rows
    sft_train: prefs.Rows
    prompts: list[dict]  # logged prompts for rejection sampling (held-out prompts excluded)
    held_prompts: list[dict]  # prompts of held-out rated answers (for the gate's sampled check)
    temperature: float  # the sampling temperature the candidate is trained and judged for

    def summary(self) -> dict:
        return {"kto_train": len(self.kto_train), "kto_held_out": len(self.kto_held),
                "dpo_train": len(self.dpo_train), "dpo_held_out": len(self.dpo_held),
                "sft_train": len(self.sft_train), "logged_prompts": len(self.prompts), "temperature": self.temperature}


def prepare_data(store, settings: TrainSettings) -> Data:
    kto_train, kto_held = prefs.split(prefs.kto_rows(store), settings.held_out_fraction)
    dpo_train, dpo_held = prefs.split(prefs.dpo_rows(store), settings.held_out_fraction)
    sft_train, _ = prefs.split(prefs.sft_rows(store), settings.held_out_fraction)
    cap = settings.max_user_share
    kto_train, dpo_train, sft_train = (prefs.cap_per_user(r, cap) for r in (kto_train, dpo_train, sft_train))
    held_ids = {prefs.rated_id(p) for p in kto_held.provenance + dpo_held.provenance}
    prompts = prefs.logged_prompts(store, exclude_message_ids=held_ids, limit=settings.rs_prompts)
    held_prompts = []
    seen = set()
    for row in kto_held.rows + dpo_held.rows:
        key = repr((row["prompt"], row["images"]))
        if key not in seen:
            seen.add(key)
            held_prompts.append({"prompt": row["prompt"], "images": row["images"]})
    temperature = settings.temperature or prefs.sampling_temperature(kto_train) or 1.0
    return Data(kto_train, kto_held, dpo_train, dpo_held, sft_train, prompts, held_prompts, temperature)


def choose_method(settings: TrainSettings, data: Data) -> str:
    method = settings.method
    if method not in METHODS:
        raise RequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "auto":
        labels = {row["label"] for row in data.kto_train.rows}
        if len(data.kto_train) >= settings.min_rows and labels == {True, False} and data.prompts:
            method = "rs"
        elif len(data.dpo_train) >= settings.min_pairs:
            method = "dpo"
        else:
            method = "kto"
    needed = {"rs": (len(data.kto_train), settings.min_rows, "thumbs"),
              "kto": (len(data.kto_train), settings.min_rows, "thumbs"),
              "dpo": (len(data.dpo_train), settings.min_pairs, "preference pairs"),
              "sft": (len(data.sft_train), settings.min_rows, "liked answers")}[method]
    have, need, what = needed
    if have < need:
        raise NotEnoughFeedback(f"not enough feedback to train ({method}): {have} {what} for training "
                                f"(after the held-out split and the per-user cap), need at least {need}")
    if method in ("rs", "kto") and {row["label"] for row in data.kto_train.rows} != {True, False}:
        raise NotEnoughFeedback(f"{method} needs both thumbs up and thumbs down in the training split")
    return method


def _dataset(rows: list[dict]):
    import datasets

    dataset = datasets.Dataset.from_list([dict(r) for r in rows])
    return dataset.cast_column("images", datasets.Sequence(datasets.Image()))


# ---------------------------------------------------------------- progress

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


# ---------------------------------------------------------------- TRL

def _lora(settings: TrainSettings, modules: str = "q_proj|k_proj|v_proj|o_proj"):
    from peft import LoraConfig

    modules = modules + ("|gate_proj|up_proj|down_proj" if settings.lora_mlp else "")
    # the language model only: a bare list of names would also hit the vision tower
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=rf".*text_model.*\.({modules})", task_type="CAUSAL_LM")


CHECKPOINTING_MIN_PARAMS = 50_000_000


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


def _train_trl(kind: str, model, processor, rows: list[dict], settings: TrainSettings, progress: Progress,
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
        trainer = trainer_cls(model=model, args=config_cls(**args), train_dataset=_dataset(rows),
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


# ---------------------------------------------------------------- the run

def _load_base(model_name: str | None, settings: TrainSettings):
    from chatapp.serving.engine import Engine, load_for_serving

    if settings.quantize:
        import torch

        if not torch.cuda.is_available():
            raise RequestError("4-bit QLoRA needs CUDA; this machine has none (train in full precision instead)")
        loaded = Engine.load(model_name or "demo", quantization=settings.quantize)
        return loaded, None
    result = load_for_serving(model_name)
    return result.engine, result.notice


@contextlib.contextmanager
def run_lock(data_dir):
    """One training run at a time per data dir. An OS file lock: the kernel releases it when the
    process dies, however it dies, so a crash never leaves it stuck."""
    import fcntl

    path = Path(data_dir) / ".train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingBusy("another training run is in progress for this data dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TrainingBusy(RequestError):
    pass


class NoCandidate(Exception):
    """The run ended without a candidate to judge: recorded as rejected, nothing published."""

    def __init__(self, reason: str, metrics: dict):
        super().__init__(reason)
        self.metrics = metrics


def train(store, registry, model_name: str | None = None, settings: TrainSettings | None = None,
          log=print) -> RunResult:
    """One training run, start to finish. Raises NotEnoughFeedback (nothing recorded) when there is
    too little feedback, TrainingBusy when another run holds the lock; any other failure marks the
    run failed and re-raises."""
    settings = (settings or TrainSettings()).validate()
    with run_lock(store.data_dir):
        return _train(store, registry, model_name, settings, log)


def _train(store, registry, model_name, settings: TrainSettings, log) -> RunResult:
    from chatapp.learning import gate, registry as adapters

    for stale in store.fail_stale_runs():
        log(f"train: run {stale} had died; marked failed")
    data = prepare_data(store, settings)
    method = choose_method(settings, data)
    live = registry.active()
    run_id = store.create_run(method, settings.as_dict(), live)
    progress = Progress(store, run_id, log)
    try:
        threads = limit_resources(settings.threads, settings.priority)
        progress.start("loading the model", 0)
        engine, notice = _load_base(model_name, settings)
        if notice:
            log(f"notice: {notice}")
        base, processor = engine.model, engine.processor
        fingerprint = adapters.base_fingerprint(base)
        live_path = registry.validate(live, fingerprint) if live else None
        store.update_run(run_id, rows=len(data.kto_train) + len(data.dpo_train),
                         metrics={"data": data.summary(), "threads": threads})
        import torch

        torch.manual_seed(settings.seed)
        lr = settings.learning_rate or DEFAULT_LR[method]
        scorer = None
        extra_metrics: dict = {}
        if method == "rs":
            model, scorer, extra_metrics, candidates = _rejection_sampling(base, processor, data, settings, progress,
                                                                           live_path)
        else:
            model, candidates = _plain(method, base, processor, data, settings, progress, live_path, lr), ["candidate"]
        if live_path and "live" not in model.peft_config:
            model.load_adapter(str(live_path), adapter_name="live")
        model.eval()
        progress.start("evaluating (gate)", 0)
        probe = _probe(engine, settings)
        gate_settings = gate.GateSettings(temperature=data.temperature)
        held_prompts = [{"prompt": p["prompt"], "images": gate.modelops.load_images(p["images"])}
                        for p in gate.style_prompt_sample(data.held_prompts, gate_settings.style_prompts)]
        verdicts: dict[str, dict] = {}
        live_metrics = None
        for name in candidates:  # the live policy is measured once, then every candidate against it
            verdicts[name] = gate.decide(model, processor, candidate=name, live="live" if live_path else None,
                                         held_kto=data.kto_held.rows, held_dpo=data.dpo_held.rows, probe=probe,
                                         settings=gate_settings, scorer=scorer, style_prompts=held_prompts,
                                         live_metrics=live_metrics, log=log)
            live_metrics = verdicts[name]["live"]
        candidate = gate.choose(verdicts)
        verdict = verdicts[candidate]
        metrics = dict(verdict, data=data.summary(), threads=threads, **extra_metrics)
        decision, reason = verdict["decision"], verdict["reason"]
        if len(candidates) > 1:
            epochs = settings.candidates(method)
            metrics["chosen"] = candidate
            metrics["candidates"] = {name: {"epochs": epochs[name], "decision": v["decision"], "reason": v["reason"],
                                            "metrics": v["candidate"]} for name, v in verdicts.items()}
            log("train: candidates " + "; ".join(f"{n}: {v['decision']}" for n, v in verdicts.items())
                + f"; chosen: {candidate}")
            reason += f" (the {epochs[candidate]}-epoch candidate; trained: {', '.join(map(str, epochs.values()))})"
        version = None
        if settings.publish != "never":  # a rejected candidate is kept too: an admin may still activate it
            progress.start("publishing", 0)
            version = _publish(registry, model, candidate, engine, fingerprint, method, settings, data, metrics,
                               decision, reason, live, activate=decision == "promoted" or settings.publish == "always")
        store.finish_run(run_id, decision, decision=decision, reason=reason, metrics=metrics,
                         candidate_version=version, phase="done")
        log(f"train: {decision} ({reason})" + (f"; published {version}" if version else ""))
        return RunResult(run_id, method, decision, reason, version, metrics)
    except NoCandidate as rejected:
        store.finish_run(run_id, "rejected", decision="rejected", reason=str(rejected), metrics=rejected.metrics,
                         phase="done")
        log(f"train: rejected ({rejected})")
        return RunResult(run_id, method, "rejected", str(rejected), None, rejected.metrics)
    except BaseException as error:
        store.finish_run(run_id, "failed", error=f"{type(error).__name__}: {error}"[:2000], phase="failed")
        raise


def _probe(engine, settings: TrainSettings) -> list[dict]:
    from chatapp.core import config
    from chatapp.learning import gate

    if settings_regression := getattr(settings, "regression_set", None):
        return gate.jsonl_probe(settings_regression)
    if engine.model_id == config.DEMO_MODEL_NAME:
        return gate.demo_probe(gate.GateSettings().probe_per_type)
    return []


def _plain(method, base, processor, data: Data, settings, progress, live_path, lr):
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
        model = _train_trl(method, model, processor, rows, settings, progress, lr, settings.epochs, extra=extra,
                           temperature=temperature)
        _rename_adapter(model, model.active_adapter, "candidate")
    else:
        model = _train_trl(method, base, processor, rows, settings, progress, lr, settings.epochs,
                           peft_config=_lora(settings), extra=extra, temperature=temperature)
        _rename_adapter(model, model.active_adapter, "candidate")
    return model


def _rename_adapter(model, old: str, new: str) -> None:
    """Copy adapter `old` under the name `new` (peft has no rename) and drop `old`."""
    if old == new:
        return
    with tempfile.TemporaryDirectory(prefix="chatapp-adapter-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[old])
        folder = Path(tmp) / old if (Path(tmp) / old).is_dir() else Path(tmp)
        model.load_adapter(str(folder), adapter_name=new)
    model.set_adapter(new)
    model.delete_adapter(old)


def _rejection_sampling(base, processor, data: Data, settings: TrainSettings, progress: Progress, live_path):
    from chatapp.learning import modelops

    # 1. the scorer: KTO on the votes (reference: the base, adapters disabled)
    progress.phase = "training the scorer (kto)"
    desirable, undesirable = prefs.kto_weights(data.kto_train)
    model = _train_trl("kto", base, processor, data.kto_train.rows, settings, progress, DEFAULT_LR["scorer"],
                       settings.scorer_epochs, peft_config=_lora(settings),
                       extra={"beta": settings.beta, "desirable_weight": desirable,
                              "undesirable_weight": undesirable}, schedule="constant")
    _rename_adapter(model, model.active_adapter, "scorer")
    model.eval()
    train_items = [{"prompt": r["prompt"], "images": modelops.load_images(r["images"]),
                    "completion": r["completion"][0]["content"][0]["text"], "label": r["label"]}
                   for r in data.kto_train.rows]
    progress.start("scoring the votes", 0)
    from chatapp.learning import gate

    train_rewards = gate.rewards(model, processor, train_items, "scorer")
    liked = train_rewards[[i for i, it in enumerate(train_items) if it["label"]]]
    disliked = train_rewards[[i for i, it in enumerate(train_items) if not it["label"]]]
    midpoint = float((liked.mean() + disliked.mean()) / 2)
    threshold = float(liked.mean()) if settings.keep == "liked" else midpoint
    # The gate's first check, on the scorer before any sampling: votes that do not predict held-out
    # votes (random ones) cannot make a candidate that passes it, so the run stops here, minutes early.
    held = gate.preference_metrics(model, processor, data.kto_held.rows, [], "scorer")
    if shortfall := gate.auc_shortfall(held, gate.GateSettings()):
        raise NoCandidate(f"the votes do not predict each other (a scorer trained on them: {shortfall})",
                          {"scorer": held})

    # 2. best-of-N sampled answers on logged prompts, from the current policy; 3. the candidate: LoRA SFT
    # on the kept answers. With rs_rounds > 1 the next round samples from this round's candidate (whose
    # answers are mostly in the liked style already, so the kept set is purer) and trains a new one.
    if live_path:
        model.load_adapter(str(live_path), adapter_name="live")
    policy = "live" if live_path and settings.start_from == "active" else None
    prompts = [{"prompt": p["prompt"], "images": modelops.load_images(p["images"])} for p in data.prompts]
    metrics = {"rs": {"scorer_held_out_auc": held.get("auc"), "midpoint": midpoint, "liked_reward": float(liked.mean()),
                      "disliked_reward": float(disliked.mean()), "prompts": len(prompts), "rounds": []}}
    for round_number in range(1, settings.rs_rounds + 1):
        of_rounds = f" (round {round_number} of {settings.rs_rounds})" if settings.rs_rounds > 1 else ""
        kept, round_metrics = _best_of_n(model, processor, prompts, data.prompts, policy, threshold, settings,
                                         progress, of_rounds)
        metrics["rs"]["rounds"].append(round_metrics)
        metrics["rs"].update(samples=round_metrics["samples"], kept=round_metrics["kept"],
                             kept_examples=round_metrics["kept_examples"])
        if len(kept) < settings.batch_size:
            raise NoCandidate(f"rejection sampling kept only {len(kept)} answers of {len(prompts)} prompts "
                              f"(the scorer finds too few sampled answers better than the votes' midpoint)", metrics)
        last = round_number == settings.rs_rounds
        trained = settings.candidates("rs") if last else {"candidate": settings.epochs}
        for name, epochs in trained.items():
            if name in model.peft_config:  # a fresh LoRA each round, trained on that round's answers
                model.delete_adapter(name)
            if live_path and settings.start_from == "active":
                model.load_adapter(str(live_path), adapter_name=name, is_trainable=True)
            else:
                model.add_adapter(name, _lora(settings, settings.candidate_modules))
            model.set_adapter(name)
            model.train()
            progress.phase = "training the candidate (sft)" + of_rounds + (
                f", {epochs} epochs" if len(trained) > 1 else "")
            _train_trl("sft", model, processor, kept, settings, progress, settings.learning_rate or DEFAULT_LR["rs"],
                       epochs, temperature=data.temperature)
            model.eval()
        if not last:
            # the next round samples from a frozen copy of this candidate
            _rename_adapter(model, "candidate", "policy")
            policy = "policy"
    if "policy" in model.peft_config:
        model.delete_adapter("policy")
    model.set_adapter("candidate")
    return model, "scorer", metrics, list(trained)


def _best_of_n(model, processor, prompts: list[dict], stored_prompts: list[dict], policy, threshold: float,
               settings: TrainSettings, progress: Progress, of_rounds: str = "") -> tuple[list[dict], dict]:
    """Sample `best_of` answers per prompt from adapter `policy` (None: the base), score them with the
    "scorer" adapter, and keep per prompt the best answer whose reward clears `threshold`."""
    from chatapp.learning import modelops

    progress.start(f"sampling {settings.best_of} answers to {len(prompts)} prompts{of_rounds}",
                   len(prompts) * settings.best_of)
    done = [0]

    def advance(n):
        done[0] += n
        progress.step(done[0])

    with modelops.adapter(model, policy):
        samples = modelops.sample_answers(model, processor, prompts, settings.best_of,
                                          temperature=settings.rs_temperature, max_new_tokens=settings.max_new_tokens,
                                          seed=settings.seed, progress=advance)
    flat = [dict(p, completion=a) for p, group in zip(prompts, samples) for a in group if a]
    owners = [i for i, group in enumerate(samples) for a in group if a]
    progress.start("scoring the samples" + of_rounds, 0)
    with modelops.adapter(model, "scorer"):
        scorer_logps = modelops.completion_logps(model, processor, flat)
    with modelops.adapter(model, None):
        base_logps = modelops.completion_logps(model, processor, flat)
    sample_rewards = scorer_logps - base_logps
    # Among a prompt's answers that clear the threshold, keep the one the base finds likely, nudged by the
    # reward: the largest reward alone favours rare (often wrong) answers whose base probability is tiny,
    # the base likelihood alone lets other styles through (measured: README table).
    best: dict[int, tuple[float, str]] = {}
    if os.environ.get("CHATAPP_RS_DUMP"):  # experiments: every sample with its scores
        import json as _json
        Path(os.environ["CHATAPP_RS_DUMP"]).write_text(_json.dumps({"threshold": threshold, "samples": [
            [o, it["completion"], r, sl, bl] for o, it, r, sl, bl in zip(owners, flat, sample_rewards.tolist(),
                                                                        scorer_logps.tolist(), base_logps.tolist())]}))
    ranks = {"likelihood": scorer_logps, "base": base_logps, "reward": sample_rewards,
             "mix": base_logps + settings.reward_weight * sample_rewards}[settings.select].tolist()
    for owner, item, reward, rank in zip(owners, flat, sample_rewards.tolist(), ranks):
        if reward > threshold and (owner not in best or rank > best[owner][0]):
            best[owner] = (rank, item["completion"])
    kept = [{"images": stored_prompts[i]["images"], "prompt": stored_prompts[i]["prompt"],
             "completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}]}
            for i, (_, text) in sorted(best.items())]
    return kept, {"samples": len(flat), "kept": len(kept),
                  "kept_examples": [k["completion"][0]["content"][0]["text"] for k in kept[:12]]}


def _publish(registry, model, candidate, engine, fingerprint, method, settings, data: Data, metrics, decision,
             reason, parent, activate: bool) -> str:
    feedback_ids = sorted({prefs.rated_id(p) for p in data.kto_train.provenance + data.dpo_train.provenance})
    with tempfile.TemporaryDirectory(prefix="chatapp-publish-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[candidate], safe_serialization=True)
        folder = Path(tmp) / candidate if (Path(tmp) / candidate).is_dir() else Path(tmp)
        metadata = {"base_model": engine.model_id, "base_fingerprint": fingerprint, "method": method,
                    "parent": parent, "hyperparameters": settings.as_dict(), "feedback_ids": feedback_ids,
                    "metrics": metrics, "gate": {"decision": decision, "reason": reason}}
        version = registry.publish(folder, metadata)
    if activate:  # an admin's `--publish always` may activate a candidate the gate rejected
        registry.activate(version, reason=f"gate: {reason}" if decision == "promoted" else "published with --publish always",
                          base_fingerprint=fingerprint, force=decision != "promoted")
    return version
