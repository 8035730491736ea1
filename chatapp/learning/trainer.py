"""One training run, start to finish: feedback -> a LoRA adapter -> the gate -> the registry.

    store -> data (rows, held-out split, per-user cap) -> recipe (rejection / trl_runs) -> gate -> publish

Methods (`--method`, see `settings`): `rs` (the default `auto` when there are thumbs; `rejection`),
`kto`, `dpo`, `sft` (plain TRL runs, `trl_runs.train_plain`).

Invariants:
- One run at a time per data dir (`run_lock`: an OS file lock, released by the kernel however the
  process dies; a second run gets TrainingBusy).
- Settings are checked and the data is prepared before anything is loaded or recorded: bad
  settings raise RequestError and too little feedback NotEnoughFeedback, with no run row.
- Nothing is published unless the gate promotes it or the caller asks for it; a run that raises is
  marked failed in the store and publishes nothing; a run that ends without a candidate
  (NoCandidate) is recorded as rejected. A run records its version as soon as it is published;
  one that fails (or dies) after activating it keeps its decision, with the error beside it.
- The run's progress (phase, step, total, loss, rewards, ETA) and result are written to the store.
- Before it trains, a run states its cost (`cost`: unit costs measured on the loaded model x its
  work), logged and stored with the run; `--budget` cuts the run to fit, or refuses it (failed,
  with the estimate) when it cannot be cut enough.
- The run's answers (rejection sampling, the gate) are sampled by one `sampler` (learning/sampler.py): here,
  or on a model server (`train --backend openai`); scoring and training always run here. The run's metrics
  (`sampling`) and log say which sampler each phase used.
- Torch threads and the process priority are limited, so a chat served from the same machine stays
  responsive (default: 1 thread when the machine has 2 cores or fewer; SCHED_IDLE and nice 10).
- A run's temp files (TRL's output folder, the adapter saved for publishing) live in
  `<data dir>/.train-tmp`, emptied when a run starts and ends under the run lock: a run killed with
  SIGKILL leaves no folder behind in the system's temp dir, the next run removes its files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chatapp.core.errors import RequestError
from chatapp.core.files import LockBusy, file_lock
from chatapp.learning.advice import advise, with_advice
from chatapp.learning.data import Data, choose_method, prepare_data
from chatapp.learning.publish import publish_candidate
from chatapp.learning.rejection import NoCandidate, rejection_sampling
from chatapp.learning.settings import DEFAULT_LR, TrainSettings
from chatapp.learning.trl_runs import Progress, train_plain

LOCK_NAME = ".train.lock"
SCRATCH_NAME = ".train-tmp"


class TrainingBusy(RequestError):
    pass


@dataclass
class RunResult:
    run_id: int
    method: str
    decision: str
    reason: str
    version: str | None
    metrics: dict = field(default_factory=dict)


@contextlib.contextmanager
def run_lock(data_dir):
    """One training run at a time per data dir. An OS file lock: the kernel releases it when the
    process dies, however it dies, so a crash never leaves it stuck."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(Path(data_dir) / LOCK_NAME, wait=False))
        except LockBusy:  # only the acquiring: a LockBusy from inside the run is not this lock's
            raise TrainingBusy("another training run is in progress for this data dir") from None
        yield


@contextlib.contextmanager
def scratch_space(data_dir):
    """Every temp file of the run under `<data dir>/.train-tmp` (hold the run lock: one run uses it)."""
    scratch = Path(data_dir) / SCRATCH_NAME
    shutil.rmtree(scratch, ignore_errors=True)  # what a killed run left
    scratch.mkdir(parents=True)
    previous, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)


def limit_resources(threads: int | None, priority: str = "idle") -> int:
    """Fewer torch threads and a lower priority than the chat; returns the thread count used.
    priority "idle" (Linux SCHED_IDLE, on top of nice 10): the run only gets CPU time the chat does
    not want. Nice alone was not enough on 2 cores: the serving process's two OpenMP threads need
    both cores at once, and a niced trainer holding one made the SmolVLM-sized model's p95
    inter-token gap 1.60x idle; under SCHED_IDLE it was 0.99x (bench/contention.py, docs/benchmarks.md)."""
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


def train(store, registry, model_name: str | None = None, settings: TrainSettings | None = None,
          log=print, backend=None) -> RunResult:
    """One training run, start to finish. Raises NotEnoughFeedback (nothing recorded) when there is
    too little feedback, TrainingBusy when another run holds the lock; any other failure marks the
    run failed and re-raises. `backend` (a `sampler.BackendSpec`, `train --backend openai`): the run's
    answers are sampled on that model server; None: here."""
    settings = (settings or TrainSettings()).validate()
    with run_lock(store.data_dir), scratch_space(store.data_dir):
        return _train(store, registry, model_name, settings, log, backend)


def _train(store, registry, model_name, settings: TrainSettings, log, backend=None) -> RunResult:
    # torch, scipy and the model's libraries come in when a run starts, not when `train --watch` starts
    from chatapp.learning import gate, modelops
    from chatapp.learning.fingerprint import base_fingerprint
    from chatapp.learning.sampler import make_sampler

    live = registry.active()
    for stale in store.fail_stale_runs(live):
        log(f"train: run {stale} had died; recorded as ended")
    data = prepare_data(store, settings)
    method = choose_method(settings, data)
    run_id = store.create_run(method, settings.as_dict(), live)
    progress = Progress(store, run_id, log)
    sampler = None
    try:
        threads = limit_resources(settings.threads, settings.priority)
        progress.start("loading the model", 0)
        loading = time.monotonic()
        engine, notice = _load_base(model_name, settings)
        if notice:
            log(f"notice: {notice}")
        base, processor = engine.model, engine.processor
        modelops.use_image_detail(processor, data.image_detail)  # prompts rebuilt as they were generated
        fingerprint = base_fingerprint(base)
        live_path = registry.validate(live, fingerprint) if live else None
        sampler = make_sampler(backend, local_model=engine.model_id, live=live, live_path=live_path,
                               image_detail=data.image_detail, run_id=run_id, log=log)
        store.update_run(run_id, rows=len(data.kto_train) + len(data.dpo_train),
                         metrics={"data": data.summary(), "threads": threads})
        settings, data = _estimate(store, run_id, progress, engine, method, data, settings, bool(live_path), sampler,
                                   time.monotonic() - loading, log)
        import torch

        torch.manual_seed(settings.seed)
        scorer = None
        extra_metrics: dict = {}
        if method == "rs":
            model, scorer, extra_metrics, candidates = rejection_sampling(base, processor, data, settings, progress,
                                                                          live_path, sampler)
        else:
            lr = settings.learning_rate or DEFAULT_LR[method]
            model = train_plain(method, base, processor, data, settings, progress, live_path, lr)
            candidates = ["candidate"]
        if live_path and "live" not in model.peft_config:
            model.load_adapter(str(live_path), adapter_name="live")
        model.eval()
        progress.start("evaluating (gate)", 0)
        verdicts = _judge(model, processor, candidates, engine, settings, data, scorer, bool(live_path), log, sampler)
        candidate = gate.choose(verdicts)
        verdict = verdicts[candidate]
        metrics = dict(verdict, data=data.summary(), threads=threads, sampling=_sampling_report(sampler, log),
                       **extra_metrics)
        decision, reason = verdict["decision"], verdict["reason"]
        if len(candidates) > 1:
            epochs = settings.candidates(method)
            metrics["chosen"] = candidate
            metrics["candidates"] = {name: {"epochs": epochs[name], "decision": v["decision"], "reason": v["reason"],
                                            "metrics": v["candidate"]} for name, v in verdicts.items()}
            log("train: candidates " + "; ".join(f"{n}: {v['decision']}" for n, v in verdicts.items())
                + f"; chosen: {candidate}")
            reason += f" (the {epochs[candidate]}-epoch candidate; trained: {', '.join(map(str, epochs.values()))})"
        if decision == "rejected":  # what more feedback would help, stored with the run (the admin tab shows it)
            reason = with_advice(reason, advise(data, reason, metrics, settings.held_out_fraction))
        version = None
        if settings.publish != "never":  # a rejected candidate is kept too: an admin may still activate it
            progress.start("publishing", 0)
            version = publish_candidate(registry, model, candidate, engine.model_id, fingerprint, method, settings,
                                        data, metrics, decision, reason, live,
                                        activate=decision == "promoted" or settings.publish == "always",
                                        on_published=lambda v: store.update_run(run_id, candidate_version=v,
                                                                                decision=decision, reason=reason))
        store.finish_run(run_id, decision, decision=decision, reason=reason, metrics=metrics,
                         candidate_version=version, phase="done")
        log(f"train: {decision} ({reason})" + (f"; published {version}" if version else ""))
        return RunResult(run_id, method, decision, reason, version, metrics)
    except NoCandidate as rejected:
        if sampler is not None:
            rejected.metrics["sampling"] = _sampling_report(sampler, log)
        reason = with_advice(str(rejected), advise(data, str(rejected), rejected.metrics, settings.held_out_fraction))
        store.finish_run(run_id, "rejected", decision="rejected", reason=reason, metrics=rejected.metrics,
                         phase="done")
        log(f"train: rejected ({reason})")
        return RunResult(run_id, method, "rejected", reason, None, rejected.metrics)
    except BaseException as error:
        message = f"{type(error).__name__}: {error}"[:2000]
        published = (store.run(run_id) or {}).get("candidate_version")
        if published and published == _active_or_none(registry):  # its adapter is live: the run did its work
            store.finish_run(run_id, store.run(run_id)["decision"], error=f"after activating {published}: {message}",
                             phase="done")
        else:
            store.finish_run(run_id, "failed", error=message, phase="failed")
        raise
    finally:
        if sampler is not None:
            sampler.close()


def _sampling_report(sampler, log) -> dict:
    """Which sampler each phase used, with its counts (stored in the run's metrics, and logged)."""
    report = sampler.report()
    for phase, counts in report.items():
        where = counts["sampler"] + (f" ({counts['engine']} at {counts['url']}, {counts['requests']} requests)"
                                     if counts["sampler"] == "openai" else "")
        log(f"train: {phase}: {counts['answers']} answers, {where}, {counts['seconds']:.1f} s")
    return report


def _estimate(store, run_id: int, progress: Progress, engine, method: str, data: Data, settings: TrainSettings,
              has_live: bool, sampler, load_s: float, log) -> tuple[TrainSettings, Data]:
    """The run's cost, stated before it trains (`cost`): unit costs measured on the loaded model x the
    run's work, fitted to `--budget` (fewer prompts or steps), stored with the run and logged.
    Raises OverBudget (the estimate stored) when the run cannot be cut to fit."""
    from chatapp.learning import cost

    progress.start("measuring what the run will cost", 0)
    units = cost.calibrate(engine.model, engine.processor, method, data, settings, load_s, sampler=sampler)
    shape = cost.Shape.of(method, data, len(_probe(engine, settings)), has_live)
    try:
        settings, shape, estimate = cost.fit(shape, settings, units, settings.budget_min)
    except cost.OverBudget as refused:
        store.update_run(run_id, estimate=dict(refused.estimate.as_dict(), units=units.as_dict()))
        raise
    store.update_run(run_id, estimate=dict(estimate.as_dict(), units=units.as_dict()), settings=settings.as_dict())
    log(f"train: estimate {estimate.summary()}" + (f"; {estimate.scaled}" if estimate.scaled else ""))
    return settings, data.first_prompts(shape.prompts)


def _active_or_none(registry) -> str | None:
    try:
        return registry.active()
    except Exception:  # an unreadable pointer: nothing can be said to be live
        return None


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


def _judge(model, processor, candidates: list[str], engine, settings: TrainSettings, data: Data, scorer,
           has_live: bool, log, sampler=None) -> dict[str, dict]:
    """The gate's verdict on each candidate, name -> verdict; the live policy is measured once, then
    every candidate against it."""
    from chatapp.learning import gate

    probe = _probe(engine, settings)
    gate_settings = gate.GateSettings(temperature=data.temperature)
    held_prompts = [{"prompt": p["prompt"], "images": gate.modelops.load_images(p["images"])}
                    for p in gate.style_prompt_sample(data.held_prompts, gate_settings.style_prompts)]
    verdicts: dict[str, dict] = {}
    live_metrics = None
    for name in candidates:
        verdicts[name] = gate.decide(model, processor, candidate=name, live="live" if has_live else None,
                                     held_kto=data.kto_held.rows, held_dpo=data.dpo_held.rows, probe=probe,
                                     settings=gate_settings, scorer=scorer, style_prompts=held_prompts,
                                     live_metrics=live_metrics, log=log, sampler=sampler)
        live_metrics = verdicts[name]["live"]
    return verdicts


def _probe(engine, settings: TrainSettings) -> list[dict]:
    from chatapp.core import config
    from chatapp.learning import gate

    if settings.regression_set:
        return gate.jsonl_probe(settings.regression_set)
    if engine.model_id == config.DEMO_MODEL_NAME:
        return gate.demo_probe(settings.probe_per_type)
    return []
