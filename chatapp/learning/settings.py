"""What a training run may be asked to do (`TrainSettings`), when the background trainer starts one
(`WatchSettings`), and the command-line flags made from both.

Invariants:
- Each setting is declared once, on its dataclass field: the default, and in its metadata (`setting`)
  the flag, help, choices and bounds. `add_flags` makes the argparse flags from the fields and
  `check_declared` checks the same choices and bounds, so `train`'s flags, the background trainer's
  `--trainer-args` and Python callers get one set of rules and one wording of each error. Fields
  without a flag are recipe constants that only code (tests, bench/) changes.
- Bad settings raise RequestError in `validate`, before anything is loaded or recorded.
- A flag's value lands in the namespace under the flag's own name (`--from` -> `from`,
  `--train-every` -> `train_every`); `from_args` maps it back to the field.
- `lora_alpha` is 2 x `lora_r` unless given.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass

from chatapp.core import config
from chatapp.core.errors import RequestError
from chatapp.feedback import prefs

METHODS = ("auto", "rs", "kto", "dpo", "sft")
DEFAULT_LR = {"rs": 2e-3, "kto": 1e-3, "dpo": 1e-3, "sft": 2e-3, "scorer": 1e-3}
CHECKPOINTING_MIN_PARAMS = 50_000_000  # gradient checkpointing "auto" turns on from this model size


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: low <= value <= high, either end open or absent."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    unit: str = ""

    def contains(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.high is None:
            return f"{'above' if self.open_low else 'at least'} {self.low}{unit}"
        if not (self.open_low or self.open_high):
            return f"between {self.low} and {self.high}{unit}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}{unit}"


def setting(default, *, flag: str | None = None, help: str | None = None, choices: tuple | None = None,
            bounds: Bounds | None = None, parse=None, metavar: str | None = None, label: str | None = None):
    """A dataclass field with its declaration: `flag` (none: not on the command line), `help`,
    `choices` or `bounds` (checked by `check_declared`), `parse` (the flag's text -> value, instead of
    the field's type), `label` (the setting's name in errors; default: the field name in words)."""
    metadata = {k: v for k, v in dict(flag=flag, help=help, choices=choices, bounds=bounds, parse=parse,
                                      metavar=metavar, label=label).items() if v is not None}
    return dataclasses.field(default=default, metadata=metadata)


def epoch_list(text: str) -> tuple[int, ...]:
    """`8`, `8,12` or `none` (no extra candidates)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch counts like 8 or 6,8 (or none), got {text!r}") from None


@dataclass
class TrainSettings:
    method: str = setting("auto", flag="--method", choices=METHODS, help=(
        "rs: rejection sampling, answers picked by a scorer trained on the votes; kto, dpo, sft: TRL on the "
        "thumbs, the preference pairs or the liked answers; auto: rs when there are thumbs up and down, "
        "else dpo with enough pairs, else kto"))
    start_from: str = setting("active", flag="--from", choices=("active", "base"), label="--from",
                              help="start from the live adapter or from the base model")
    max_steps: int | None = setting(None, flag="--max-steps", bounds=Bounds(1),
                                    help="cap the optimizer steps of each training phase (default: no cap)")
    epochs: int = setting(4, flag="--epochs", bounds=Bounds(1, 100), help="epochs of each training phase")
    scorer_epochs: int = 10  # a weak scorer (3 epochs) let other styles through (docs/learning.md, recipe table)
    learning_rate: float | None = setting(None, flag="--lr", metavar="RATE",
                                          bounds=Bounds(0, 1, open_low=True, open_high=True),
                                          help="learning rate (default: per method, "
                                               + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()
                                                           if m != "scorer") + ")")
    batch_size: int = setting(8, flag="--batch-size", bounds=Bounds(1, 256), help=(
        "rows per step; use 1-2 for real-size models on a CPU: ~1.4 GB of activations per SmolVLM-256M image row"))
    grad_accum: int = setting(1, flag="--grad-accum", bounds=Bounds(1, 256), help=(
        "batches per optimizer step: --batch-size 2 --grad-accum 4 trains like a batch of 8 with two rows' "
        "memory (KTO, and so the rs scorer, needs at least 2 rows a batch)"))
    # auto: on for real-size models, where activations are most of a run's memory (bench/training.py),
    # off for the demo model, whose activations are a few MB
    gradient_checkpointing: str = setting("auto", flag="--gradient-checkpointing", choices=("auto", "on", "off"),
                                          help="recompute activations in the backward pass to save memory; auto: "
                                               f"on for models of {CHECKPOINTING_MIN_PARAMS // 10**6} M parameters "
                                               "or more")
    lora_r: int = setting(8, flag="--lora-r", bounds=Bounds(1, 256), help="LoRA rank")
    lora_alpha: int | None = setting(None, flag="--lora-alpha", bounds=Bounds(1),
                                     help="LoRA scaling numerator (default: 2 x --lora-r)")
    # with the MLP, regime g (a style per kind of question) reached 0.95 instead of 0.72 (docs/learning.md)
    lora_mlp: bool = setting(True, flag="--lora-mlp", help="LoRA on the MLP projections too, not only on attention")
    candidate_modules: str = "q_proj|k_proj|v_proj|o_proj"
    lr_schedule: str = "linear"  # the candidate's; the scorer uses a constant rate
    # rs: among answers above the threshold, the best by (log p_base + reward_weight * reward) per token
    # ("mix-mean"; "mix": the sums, which favour short answers that leave things out, "Red." for a red and a
    # blue square; likelihood: by log p_scorer; reward: by reward alone) -- docs/learning.md, recipe table
    select: str = setting("mix-mean", choices=("mix-mean", "mix", "likelihood", "base", "reward"))
    reward_weight: float = 0.1
    # rs: keep the best answer when its reward is above the midpoint | liked (the liked mean)
    keep: str = setting("midpoint", choices=("midpoint", "liked"))
    # rs: the policy's own answers to a few text-only openers, about this share of the SFT rows (rejection.py)
    anchor_share: float = 0.1
    beta: float = 0.1
    best_of: int = setting(8, flag="--best-of", bounds=Bounds(2, 64), help="rs: answers sampled per prompt")
    rs_prompts: int = setting(1000, flag="--prompts", bounds=Bounds(1, 100_000),
                              help="rs: logged prompts to sample on")
    # rs: with fewer prompts than this, several distinct answers per prompt are kept, up to about this
    # many in all (regime b of bench/learning.py: 48 voted prompts, no unvoted chats)
    rs_keep_rows: int = setting(200, bounds=Bounds(1))
    # rs: with fewer logged prompts than this, the training side's single-image questions are also asked
    # about its other images, up to this many prompts (regime b: 44 prompts; 0.49 -> 0.81 on seed 21, rejected at
    # the accuracy bar on seed 22, as it was without them: docs/learning.md)
    rs_cross_prompts: int = setting(500, flag="--cross-prompts", bounds=Bounds(0, 100_000), help=(
        "rs: with fewer logged prompts than N, also sample on the users' image questions asked about their "
        "other (training) images, up to N prompts in all and no more than --prompts (0: off)"))
    rs_temperature: float = 0.7  # fewer wrong samples than at 1.0 for the same style shift (docs/learning.md, recipe table)
    # round 2 samples from round 1's candidate (docs/learning.md, recipe table)
    rs_rounds: int = setting(2, flag="--rs-rounds", bounds=Bounds(1, 5), help=(
        "rs: rounds of sampling + SFT; each round after the first samples from the previous round's candidate"))
    # no one epoch count met the bar for every style (docs/learning.md, recipe table)
    rs_extra_epochs: tuple[int, ...] = setting((8, 12), flag="--rs-extra-epochs", parse=epoch_list, metavar="N[,N]",
                                               help="rs: the last round also trains candidates for these epoch "
                                                    "counts on the same answers, and the gate publishes the best "
                                                    "that passes ('none': one candidate)")
    temperature: float | None = setting(None, flag="--temperature", metavar="T",
                                        bounds=Bounds(0, config.TEMPERATURE_MAX, open_low=True), help=(
        "the sampling temperature users chat at, which rs/sft candidates are trained for (loss on logits / T) "
        "and the gate's sampled check runs at (default: the one the voted answers were sampled at, 1 when "
        "none was sampled)"))
    max_new_tokens: int = 64
    min_rows: int = setting(20, flag="--min-rows", bounds=Bounds(1, 1_000_000),
                            help="no run below this many training rows")
    min_pairs: int = 20
    max_user_share: float = setting(prefs.MAX_USER_SHARE, flag="--max-user-share",
                                    bounds=Bounds(0, 1, open_low=True), help="cap on one user's share of the rows")
    held_out_fraction: float = prefs.HELD_OUT_FRACTION
    max_length: int = 2048
    seed: int = setting(0, flag="--seed", help="seed of the sampling and the training")
    budget_min: float | None = setting(None, flag="--budget", metavar="MINUTES", label="--budget",
                                       bounds=Bounds(0, open_low=True, unit="minutes"), help=(
        "cap the run at this many minutes of this machine, by its estimate made before training (measured unit "
        "costs x the run's work, docs/learning.md): rs samples on fewer prompts, the other methods train fewer "
        "steps; a run that cannot fit is refused"))
    threads: int | None = setting(None, flag="--threads", bounds=Bounds(1),
                                  help="torch threads (default: 1 on 2 cores or fewer, else half the cores)")
    priority: str = setting("idle", flag="--priority", choices=("idle", "nice"), help=(
        "idle: Linux SCHED_IDLE + nice 10, the run only uses CPU the chat leaves; nice: nice 10 only"))
    quantize: str | None = setting(None, flag="--quantize", choices=("4bit",), help="QLoRA (CUDA only)")
    publish: str = setting("gate", flag="--publish", choices=("gate", "always", "never"), help=(
        "gate: publish, activate only if the gate promotes it; always: activate anyway; never: publish nothing"))
    regression_set: str | None = setting(None, flag="--regression-set", metavar="JSONL", help=(
        "prompts, images and expected keywords for the gate's probe (models other than the demo model)"))
    # 1,000 image questions: a 2-point bar needs them (docs/learning.md, the gate)
    probe_per_type: int = setting(200, flag="--probe-per-type", bounds=Bounds(5, 2000), help=(
        "the demo model's gate probe: greedy questions per question type (five with an image, one text-only); "
        "fewer judge faster but cannot see a 2-point regression"))

    def __post_init__(self):
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r

    def candidates(self, method: str) -> dict[str, int]:
        """The adapters the last round trains, name -> epochs: "candidate" for `epochs` (the default
        one, recorded when none passes), then "candidate-eN" for each of rs's extra epoch counts."""
        extra = sorted({e for e in self.rs_extra_epochs if e != self.epochs}) if method == "rs" else []
        return {"candidate": self.epochs, **{f"candidate-e{e}": e for e in extra}}

    def as_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainSettings":
        check_declared(self)
        if not (all(1 <= e <= 100 for e in self.rs_extra_epochs) and len(self.rs_extra_epochs) <= 4):
            raise RequestError("rs extra epochs must be at most 4 epoch counts between 1 and 100, "
                               f"got {list(self.rs_extra_epochs)}")
        return self


DEFAULT_TRAIN_AFTER = 50  # new labels; ~a quarter of the ~200 votes the proof runs use
DEFAULT_QUIET_S = 60.0  # votes in one sitting come seconds apart; a minute without one ends the burst
DEFAULT_MAX_WAIT_S = 900.0  # a steady trickle still trains within 15 minutes of the run falling due


@dataclass
class WatchSettings:
    """When the background trainer's loop (`watcher.watch`) starts a run."""
    train_after: int = setting(DEFAULT_TRAIN_AFTER, flag="--train-after", bounds=Bounds(1), label="--train-after",
                               help="start a run when this many new labels (votes, preferences, compare picks) "
                                    "arrived since the last run")
    train_every_s: float | None = setting(None, flag="--train-every", bounds=Bounds(10, unit="seconds"),
                                          label="--train-every", metavar="SECONDS",
                                          help="also start a run every this many seconds when there is new "
                                               "feedback (default: no schedule)")
    retry_s: float = setting(300.0, flag="--retry-after", bounds=Bounds(0, unit="seconds"), label="--retry-after",
                             metavar="SECONDS", help="seconds to wait after a failed run before trying again")
    poll_s: float = setting(2.0, flag="--poll", bounds=Bounds(0, open_low=True, unit="seconds"), label="--poll",
                            metavar="SECONDS", help="seconds between looks at the store")
    quiet_s: float = setting(DEFAULT_QUIET_S, flag="--quiet-for", bounds=Bounds(0, unit="seconds"), label="--quiet-for",
                             metavar="SECONDS", help="start a due run only once no new label has arrived for this "
                                                     "long, so a burst of votes makes one run (0: at once)")
    max_wait_s: float = setting(DEFAULT_MAX_WAIT_S, flag="--max-wait", bounds=Bounds(0, unit="seconds"),
                                label="--max-wait", metavar="SECONDS",
                                help="but start it at the latest this long after it fell due, even while labels "
                                     "keep arriving")

    def validate(self) -> "WatchSettings":
        check_declared(self)
        if self.max_wait_s < self.quiet_s:
            raise RequestError(f"--max-wait ({self.max_wait_s:g} s) must be at least --quiet-for "
                               f"({self.quiet_s:g} s)")
        return self


def check_declared(settings) -> None:
    """Raise RequestError for the first field outside its declared choices or bounds (None passes:
    it means the default of a setting that may be left out)."""
    for field in dataclasses.fields(settings):
        value, spec = getattr(settings, field.name), field.metadata
        label = spec.get("label", field.name.replace("_", " "))
        if value is None:
            continue
        if "choices" in spec and value not in spec["choices"]:
            raise RequestError(f"{label} must be {_either(spec['choices'])}, got {value!r}")
        if "bounds" in spec and not spec["bounds"].contains(value):
            raise RequestError(f"{label} must be {spec['bounds']}, got {value}")


def _either(choices: tuple) -> str:
    if len(choices) > 3:
        return "one of " + ", ".join(choices)
    return " or ".join(filter(None, (", ".join(choices[:-1]), choices[-1])))


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_flags(parser, settings_class, only: tuple[str, ...] | None = None) -> None:
    """Add a flag to `parser` (a parser or an argument group) for each field of `settings_class`
    that declares one (of those named in `only`, when given)."""
    hints = typing.get_type_hints(settings_class)
    for field in dataclasses.fields(settings_class):
        spec = field.metadata
        if "flag" not in spec or (only is not None and field.name not in only):
            continue
        help_text = spec.get("help", "").replace("%", "%%")
        if hints[field.name] is bool:
            parser.add_argument(spec["flag"], dest=_dest(spec["flag"]), action=argparse.BooleanOptionalAction,
                                default=field.default, help=help_text)
            continue
        value_type = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        if field.default is not None:
            shown = (",".join(map(str, field.default)) or "none") if isinstance(field.default, tuple) else field.default
            help_text += f" (default: {shown})"
        metavar = None if "choices" in spec else spec.get("metavar", {int: "N", float: "X"}.get(value_type))
        parser.add_argument(spec["flag"], dest=_dest(spec["flag"]), type=spec.get("parse", value_type),
                            default=field.default, choices=spec.get("choices"), metavar=metavar, help=help_text)


def from_args(settings_class, args: argparse.Namespace):
    """The settings the parsed flags give; fields without a flag (or whose flag `args` lacks) keep
    their defaults."""
    values = {field.name: getattr(args, _dest(field.metadata["flag"])) for field in dataclasses.fields(settings_class)
              if "flag" in field.metadata and hasattr(args, _dest(field.metadata["flag"]))}
    return settings_class(**values)
