"""How one reply's next token is chosen when it decodes in a batch (serving/batching.py): what generate()
does for a batch of one, per row.

Invariants:
- A row applies transformers' own logits processors in generate()'s order: the repetition penalty,
  min_new_tokens (end-of-sequence masked), then, when sampling, temperature, top_k and top_p; scores in
  float32, as generate() computes them.
- A sampling row draws only from its own torch.Generator, seeded with the reply's seed, so other rows
  never change its draws.
- `settings_batchable` is False when the model's generation config makes generate() add any other
  logits processor: such replies are not batched (the engine serves them through generate()).
"""
from __future__ import annotations

# generation-config settings with which generate() adds a logits processor that rows here do not apply
# (repetition_penalty: a request at 1.0 does not pass it, so generate() would use the model's own)
_OTHER_PROCESSOR_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias",
                             "min_length", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_p", "top_h",
                             "typical_p", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
                             "renormalize_logits", "guidance_scale", "watermarking_config", "stop_strings",
                             "encoder_repetition_penalty", "encoder_no_repeat_ngram_size")

# values of those settings with which generate() adds no processor either (a model's config may spell them out)
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "encoder_repetition_penalty": 1.0, "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "renormalize_logits": False, "guidance_scale": 1.0}

_default_settings: dict | None = None


def settings_batchable(generation_config) -> bool:
    """Whether generate() would apply no other logits processor than the rows here do (asked per
    request: a generation config can change while the model is loaded)."""
    global _default_settings
    if _default_settings is None:
        from transformers import GenerationConfig

        defaults = GenerationConfig()
        _default_settings = {name: getattr(defaults, name, None) for name in _OTHER_PROCESSOR_SETTINGS}
    return all(getattr(generation_config, name, None) in (default, _NEUTRAL.get(name, default))
               for name, default in _default_settings.items())


class Row:
    """A request being decoded: its tokens so far and how its next one is chosen."""

    def __init__(self, request, prefill, eos_ids: list[int], device):  # batching.Request, batching.Prefill
        import torch
        from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                  TopPLogitsWarper)

        params = request.params
        self.request = request
        self.on_finish = prefill.on_finish
        self.max_new_tokens = prefill.max_new_tokens
        self.ids: list[int] = prefill.input_ids[0].tolist()
        self.cached = len(self.ids)  # positions of this row in the cache (its padding not counted)
        self.generated = 0
        self.eos_ids = eos_ids
        # generate()'s order: processors, then (sampling only) warpers
        self.penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty) \
            if params.repetition_penalty != 1.0 else None
        self.warpers, self.generator = [], None
        if not params.greedy:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(params.top_p))
            self.generator = torch.Generator(device=device).manual_seed(request.seed)

    def choose(self, logits):
        """The next token (a 0-d tensor) from this row's (1, vocab) logits."""
        import torch

        scores = logits.to(copy=True, dtype=torch.float32)  # as generate(): processors work in float32
        if self.penalty is not None:
            scores = self.penalty(torch.tensor([self.ids], device=scores.device), scores)
        if self.generated < self.request.min_new_tokens and self.eos_ids:
            scores[:, self.eos_ids] = float("-inf")
        if self.generator is None:
            return scores[0].argmax()
        for warper in self.warpers:
            scores = warper(None, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0]

    def take(self, token: int) -> bool:
        """Hand the chosen token over; True when the reply ends with it."""
        self.ids.append(token)
        self.generated += 1
        self.request.tokens.push([token])
        return token in self.eos_ids or self.generated >= self.max_new_tokens or self.request.stop.is_set()
