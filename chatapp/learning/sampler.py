"""Where a training run's answers are sampled: in this process, or on the model server that serves the chat
(`train --backend openai`), so the GPU that trains need not also hold a copy of the model generating.

The run samples in two places: rejection sampling's best-of-N answers from the live policy (and, in later
rounds, from the previous round's candidate), and the gate's greedy probe answers and sampled answers of the
live policy and of each candidate. Both call `Sampler.sample`; what the answers are scored with
(log-probabilities under the scorer and the base) and the training itself stay here, in TRL + peft: a
chat-completions server returns text, not the log-probability of a given answer under two adapters.

Invariants:
- `sample(model, processor, items, n, policy=...)` returns `n` answers per item, in item order; temperature 0
  is one greedy answer repeated `n` times. `policy` names an adapter of the peft model being trained and
  judged ("live", "policy", "candidate", ...), None the base. `InProcessSampler` is exactly what ran before
  this seam: `modelops.sample_answers` under `modelops.adapter(model, policy)`.
- `BackendSampler` sends one chat-completions request per answer, IN_FLIGHT at a time (vLLM batches them),
  each with its own seed derived from the run's. The live adapter goes as the version the registry
  published (its folder, loaded as `serve` loads it; a vLLM server that serves the chat has it already).
  Every other adapter has no published version yet: it is saved to the run's scratch folder and loaded into
  the server under a name made of the run, the adapter and a hash of its weights, so a retrained adapter is
  never answered by a stale copy. Why load the candidates into the server rather than keep their sampling
  here: the gate samples the candidates as much as the live policy, and a second round of rejection sampling
  samples from an unpublished candidate; keeping those here would keep the model generating on the training
  GPU, which is what this backend exists to avoid. Both engines that load adapters at run time (vLLM,
  `transformers serve`) load any folder they can reach; the scratch folder is under the data dir, so
  serve's `--backend-path-map` covers it. A server that cannot load adapters (a generic engine) is refused
  when the sampler is made, with the reason. The run's own adapters are unloaded when it ends (`close`);
  the published live version never is (the chat may be using it).
- Each call is counted under its phase: the sampler, the server and its engine, requests, answers, the
  server's token counts, seconds (`report()`); the trainer logs that and stores it in the run's metrics.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from chatapp.core import config
from chatapp.core.errors import RequestError

IN_FLIGHT = 8  # requests at once: enough for vLLM to batch; transformers serve takes them one at a time
LIVE = "live"  # the peft adapter name the trainer gives the registry's active version


@dataclass
class BackendSpec:
    """`--backend openai` and its flags, as `train` and serve's background trainer take them."""
    url: str
    model: str | None = None
    api_key_env: str | None = None
    path_map: list[str] = field(default_factory=list)
    engine: str | None = None
    timeout_s: float | None = None

    @classmethod
    def from_args(cls, args) -> "BackendSpec | None":
        """None for `--backend inprocess` (the default); a RequestError for openai without a URL."""
        if getattr(args, "backend", "inprocess") != "openai":
            return None
        if not args.backend_url:
            raise RequestError("--backend openai needs --backend-url, e.g. http://127.0.0.1:8000/v1")
        return cls(args.backend_url, args.backend_model, args.backend_api_key_env, list(args.backend_path_map or []),
                   args.backend_engine, args.backend_timeout)

    def check(self) -> str:
        """The server's engine, once it answers and can load adapters at run time; else BackendError (down,
        with what to do) or RequestError (an engine that cannot take the run's adapters)."""
        from chatapp.serving.openai_backend import OpenAIBackend
        from chatapp.serving.openai_wire import ENGINE_CAPABILITIES

        backend = OpenAIBackend(self.url, local_model=config.DEMO_MODEL_NAME, api_key_env=self.api_key_env,
                                path_map=self.path_map, engine=self.engine)
        try:
            backend.ping()  # also when --backend-engine spares the detection
            engine = backend.engine()
        finally:
            backend.close()
        if not ENGINE_CAPABILITIES[engine]["runtime_lora"]:
            raise RequestError(f"the model server at {self.url} ({engine}) cannot load adapters at run time, which "
                               f"the trainer's sampling needs (the live version and the candidates): use vLLM "
                               f"(--enable-lora) or transformers serve, or train with --backend inprocess")
        return engine

    def as_flags(self) -> list[str]:
        """The same spec as command-line flags (serve passes them to its background trainer)."""
        flags = ["--backend", "openai", "--backend-url", self.url]
        for flag, value in (("--backend-model", self.model), ("--backend-api-key-env", self.api_key_env),
                            ("--backend-engine", self.engine), ("--backend-timeout", self.timeout_s)):
            if value is not None:
                flags += [flag, str(value)]
        for entry in self.path_map:
            flags += ["--backend-path-map", entry]
        return flags


class _Counts:
    def __init__(self):
        self.phases: dict[str, dict] = {}

    def add(self, phase: str, policy: str | None, described: dict, **numbers) -> None:
        entry = self.phases.setdefault(f"{phase}: {policy or 'base'}", dict(described, calls=0))
        entry["calls"] += 1
        for name, value in numbers.items():
            entry[name] = round(entry.get(name, 0) + value, 3)


class InProcessSampler:
    """Answers from the model being trained, in this process."""

    def __init__(self):
        self.counts = _Counts()

    def describe(self) -> dict:
        return {"sampler": "inprocess"}

    def sample(self, model, processor, items: list[dict], n: int, *, policy: str | None, temperature: float,
               top_k: int = 0, max_new_tokens: int = 64, seed: int = 0, phase: str = "sampling",
               progress: Callable[[int], None] | None = None) -> list[list[str]]:
        from chatapp.learning import modelops

        started = time.monotonic()
        with modelops.adapter(model, policy):
            answers = modelops.sample_answers(model, processor, items, n, temperature=temperature, top_k=top_k,
                                              max_new_tokens=max_new_tokens, seed=seed, progress=progress)
        self.counts.add(phase, policy, self.describe(), answers=sum(map(len, answers)),
                        seconds=time.monotonic() - started)
        return answers

    def report(self) -> dict:
        return self.counts.phases

    def close(self) -> None:
        pass


class BackendSampler:
    """Answers from an OpenAI-compatible model server (see the module's invariants)."""

    def __init__(self, spec: BackendSpec, *, local_model: str, live: str | None, live_path, image_detail: str,
                 run_id: int, log=print):
        from chatapp.serving.openai_backend import OpenAIBackend

        engine = spec.check()  # a server that is down, or takes no adapters, fails the run here, before training
        # the run's scratch folder (trainer.scratch_space): staged and saved adapters go with it
        self.folder = Path(tempfile.mkdtemp(prefix="sampler-"))
        self.backend = OpenAIBackend(spec.url, local_model=local_model, backend_model=spec.model,
                                     api_key_env=spec.api_key_env, path_map=spec.path_map,
                                     stage_dir=self.folder / "staged", timeout_s=spec.timeout_s, engine=engine)
        self.backend.served_model()
        self.live, self.live_path = live, live_path
        self.backend.keep_loaded = lambda: {live} - {None}  # never unload the version the chat may be using
        self.image_detail = image_detail
        self.run_id = run_id
        self.counts = _Counts()
        self._temporary: dict[str, Path] = {}  # server-side name -> saved folder, this run's adapters
        log(f"train: sampling through the model server at {spec.url} ({engine}, model "
            f"{self.backend.served_model()}); scoring and training here")

    def describe(self) -> dict:
        return {"sampler": "openai", "url": self.backend.url, "engine": self.backend.engine()}

    def _version(self, model, policy: str | None) -> str | None:
        """The name the server knows `policy` by, loading it there first."""
        if policy is None:
            return None
        if policy == LIVE and self.live is not None:
            self.backend.use_adapter(self.live, self.live_path)
            return self.live
        from peft import get_peft_model_state_dict

        digest = hashlib.sha256()
        for name, tensor in sorted(get_peft_model_state_dict(model, adapter_name=policy).items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        version = f"run{self.run_id}-{policy}-{digest.hexdigest()[:10]}"
        if version not in self._temporary:
            saved = self.folder / version
            model.save_pretrained(str(saved), selected_adapters=[policy], safe_serialization=True)
            self._temporary[version] = saved / policy if (saved / policy).is_dir() else saved
        self.backend.use_adapter(version, self._temporary[version])
        return version

    def sample(self, model, processor, items: list[dict], n: int, *, policy: str | None, temperature: float,
               top_k: int = 0, max_new_tokens: int = 64, seed: int = 0, phase: str = "sampling",
               progress: Callable[[int], None] | None = None) -> list[list[str]]:
        started = time.monotonic()
        version = self._version(model, policy)
        repeats = 1 if temperature == 0 else n
        jobs = [(i, k) for i in range(len(items)) for k in range(repeats)]
        answers: list[list[str]] = [[""] * repeats for _ in items]
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        def ask(job):
            i, k = job
            params = config.validate_generation(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                                                seed=(seed * 1_000_003 + i * repeats + k) % (config.SEED_MAX + 1),
                                                image_detail=self.image_detail)
            return job, self.backend.generate(_messages(items[i]), params, adapter=version)

        def take(result) -> None:  # in the run's thread: progress writes to the store
            (i, k), reply = result
            answers[i][k] = reply.text.strip()
            usage["prompt_tokens"] += reply.meta.prompt_tokens
            usage["completion_tokens"] += reply.meta.reply_tokens
            if progress:
                progress(1)

        if jobs:
            # one request alone first: transformers serve loads a model at its first request, and several
            # first requests at once made it load the same model several times (20 answers took 46 s, not 14)
            take(ask(jobs[0]))
        with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="chatapp-sampler") as pool:
            futures = [pool.submit(ask, job) for job in jobs[1:]]
            try:
                for future in as_completed(futures):
                    take(future.result())
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        if repeats == 1:
            answers = [a * n for a in answers]
        self.counts.add(phase, policy, dict(self.describe(), served_as=version or "base"), requests=len(jobs),
                        answers=len(items) * n, server_prompt_tokens=usage["prompt_tokens"],
                        server_completion_tokens=usage["completion_tokens"], seconds=time.monotonic() - started)
        return answers

    def report(self) -> dict:
        return self.counts.phases

    def close(self) -> None:
        """Unload this run's own adapters from the server (the live version stays)."""
        for version in self._temporary:
            self.backend.unload(version)
        self.backend.close()


def make_sampler(spec: BackendSpec | None, **backend_args) -> InProcessSampler | BackendSampler:
    return InProcessSampler() if spec is None else BackendSampler(spec, **backend_args)


def _messages(item: dict) -> list[dict]:
    """A training prompt (image placeholders, images beside it in order) as a conversation for the backend."""
    images = iter(item["images"])
    messages = []
    for message in item["prompt"]:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = [{"type": "image", "image": next(images)} if part["type"] == "image" else
                 {"type": "text", "text": part["text"]} for part in content]
        messages.append({"role": message["role"], "content": parts})
    return messages
