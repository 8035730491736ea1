"""The vision encoder's precision: bfloat16 encoder layers inside an otherwise float32 model.

On a CPU, a reply's first token waits mostly for the vision tower (SigLIP, ~93 M parameters in
SmolVLM-256M: ~0.85 s a 512 px frame on this machine's 2 cores in float32, 17 frames at
`detail=high`). It is compute bound, and CPUs with AMX tiles (Intel Xeon since Sapphire Rapids)
multiply bfloat16 several times faster than float32: the encoder layers in bfloat16 took that frame
to ~0.26 s, and a 17-frame first turn from 24 s to 9 s (docs/benchmarks.md). Decoding is memory
bound, and a bfloat16 mat-vec is slower than a float32 one on this CPU (../shared/NOTES.md), so the
text model stays as it was.

Invariants:
- Only the vision encoder's layers and its final norm change dtype; the patch embeddings (the
  model's first parameters, so `model.dtype` stays float32 and nothing that reads it changes), the
  connector and the text model keep theirs. The encoder takes its input and mask in its own dtype
  and hands float32 back, so image features are float32 wherever they are used (the image feature
  cache, training, the gate).
- "auto" changes a model only on a CPU with AMX, in float32, whose vision encoder has at least
  `AUTO_MIN_VISION_PARAMS` parameters: the demo model and GPU models (already bfloat16) are left
  as they are. A model without an Idefics3-style vision tower (`model.model.vision_model` with
  `encoder` and `post_layernorm`) is left as it is.
- Applied once, when the model is loaded; a process serves and trains with the same features.
- The cast runs on one torch thread, so the loading thread never starts an OpenMP team of its own
  (`one_torch_thread`).
"""
from __future__ import annotations

import contextlib

from chatapp.core.config import ParameterError

VISION_DTYPES = ("auto", "float32", "bfloat16")
AUTO_MIN_VISION_PARAMS = 20_000_000  # SmolVLM-256M's tower: ~93 M; the demo model's: well under 1 M
ATTRIBUTE = "chatapp_vision_dtype"  # set on a model whose vision encoder was changed


def vision_tower(model):
    """The Idefics3-style vision transformer of `model` (a peft wrapper or not), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = getattr(getattr(base, "model", None), "vision_model", None)
    if tower is None or not hasattr(tower, "encoder") or not hasattr(tower, "post_layernorm"):
        return None
    return tower


def amx_available() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent: assume no
    try:
        return bool(probe and probe())
    except Exception:
        return False


def pick_vision_dtype(model, device: str, requested: str | None = None) -> str | None:
    """The dtype to give the vision encoder ("bfloat16"), or None to leave the model as loaded."""
    import torch

    requested = requested or "auto"
    if requested not in VISION_DTYPES:
        raise ParameterError(f"vision dtype must be one of {', '.join(VISION_DTYPES)}, got {requested!r}")
    tower = vision_tower(model)
    if tower is None or requested == "float32":
        return None
    if requested == "bfloat16":
        return "bfloat16"
    encoder_params = sum(p.numel() for p in tower.encoder.parameters())
    if (device.startswith("cpu") and next(tower.encoder.parameters()).dtype == torch.float32
            and encoder_params >= AUTO_MIN_VISION_PARAMS and amx_available()):
        return "bfloat16"
    return None


@contextlib.contextmanager
def one_torch_thread():
    """Torch ops of this block on the calling thread alone. A parallel op starts an OpenMP team (GNU
    libgomp) on the thread that runs it, and once more OpenMP threads exist than CPUs, libgomp stops
    spin-waiting between parallel regions: the generation thread's decode, thousands of small ops, then
    sleeps and wakes around each. Measured on 2 cores: a 2-thread cast on the loading thread took the
    SmolVLM-sized model's decode from 33 to 19 tokens/s for the rest of the process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_vision_dtype(model, dtype: str | None) -> None:
    """Run `model`'s vision encoder layers in `dtype` (None: leave it), handing float32 back."""
    import torch

    tower = vision_tower(model)
    if dtype is None or tower is None:
        return
    inner = getattr(torch, dtype)
    outer = next(tower.embeddings.parameters()).dtype
    with one_torch_thread():
        tower.encoder.to(inner)
        tower.post_layernorm.to(inner)

    def into_encoder(module, args, kwargs):
        kwargs = {name: value.to(inner) if torch.is_tensor(value) and value.is_floating_point() else value
                  for name, value in kwargs.items()}
        return tuple(a.to(inner) if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs

    def out_of_norm(module, args, output):
        return output.to(outer)

    tower.encoder.register_forward_pre_hook(into_encoder, with_kwargs=True)
    tower.post_layernorm.register_forward_hook(out_of_norm)
    setattr(model, ATTRIBUTE, dtype)


def vision_dtype_of(model) -> str:
    """What the vision encoder computes in, for logs and benchmarks: "bfloat16", or the model's dtype."""
    return getattr(model, ATTRIBUTE, None) or str(getattr(model, "dtype", "")).replace("torch.", "")
