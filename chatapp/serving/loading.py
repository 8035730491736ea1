"""Finding and loading a model: what a name means, the hub check, device, dtype and quantization.

Invariants:
- Any Hugging Face image-text-to-text model loads through `AutoModelForImageTextToText` +
  `AutoProcessor`, from a hub id or a local folder; 'demo' is the built-in demo model
  (config.DEMO_MODEL_DIR) and takes the same path.
- Every failure to load is a ModelLoadError whose message names the model, where it was looked
  for (local folder, local cache or hub) and the library's reason; bad dtype or quantization
  names are ParameterErrors.
- With HF_HUB_OFFLINE set, or when the hub's host does not answer within 3 s, the hub is never
  asked: only the local cache is read, so an offline machine fails fast.
- Quantization (bitsandbytes) is CUDA-only and refused elsewhere with the reason.
- The vision encoder may run in bfloat16 inside a float32 model (`precision`, `--vision-dtype`;
  auto: on CPUs with AMX, for real-size models); a quantized model is left as it is.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from chatapp.core import config
from chatapp.core.config import ParameterError
from chatapp.core.errors import ModelLoadError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if requested:
        if requested not in names:
            raise ParameterError(f"dtype must be one of {', '.join(names)}, got {requested!r}")
        return names[requested]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def quantization_config(quantization: str | None, device: str, dtype):
    if not quantization:
        return None
    if quantization not in ("4bit", "8bit"):
        raise ParameterError(f"quantization must be 4bit or 8bit, got {quantization!r}")
    if not device.startswith("cuda"):
        raise ModelLoadError(
            f"{quantization} loading needs a CUDA GPU and this process runs on {device}. bitsandbytes "
            "quantization is CUDA-only here: on CPU it is slower than float32 and LoRA training on it "
            "silently gets no gradients. Load the model without quantization on this machine.")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def resolve_model_path(name: str) -> str:
    """'demo' means the built-in demo model; an existing folder is used as is; anything else is a hub id."""
    if name == config.DEMO_MODEL_NAME:
        if not (config.DEMO_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"the demo model is missing from {config.DEMO_MODEL_DIR}; "
                                 "rebuild it with `python -m chatapp demo-model build`")
        return str(config.DEMO_MODEL_DIR)
    return name


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not resolve / connect quickly.
    Spares the user the hub client's ~25 s of retries on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def load_model(name: str, *, device: str | None = None, dtype: str | None = None,
               quantization: str | None = None, vision_dtype: str | None = None):
    """(model, processor) for a hub id, a local folder or 'demo', on its device and in eval mode, its vision
    encoder in `vision_dtype` (`precision`: "auto" by default). Failures raise ModelLoadError with the reason."""
    from chatapp.serving.precision import VISION_DTYPES
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_model_path(name)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    quant = quantization_config(quantization, device, torch_dtype)
    if vision_dtype not in (None, *VISION_DTYPES):
        raise ParameterError(f"vision dtype must be one of {', '.join(VISION_DTYPES)}, got {vision_dtype!r}")
    local = Path(path).exists()
    if not local and not HUB_ID.fullmatch(path):
        raise ModelLoadError(f"model {name!r} is neither a local folder nor a hub id like "
                             f"'{config.DEFAULT_MODEL}'")
    # A hub model that is not cached, with no hub to reach, fails fast and says so.
    offline = not local and not hub_reachable()
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=offline)
        kwargs = {"dtype": torch_dtype, "local_files_only": offline}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": device})
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as error:  # any failure to load is the user's to act on: say which and why
        where = ("the local folder" if local else
                 "the local cache (the hub is unreachable or HF_HUB_OFFLINE is set)" if offline else "the hub")
        raise ModelLoadError(f"could not load model {name!r} from {where}: {str(error).splitlines()[0]}") from error
    if quant is None:
        from chatapp.serving.precision import pick_vision_dtype, use_vision_dtype

        model.to(device)
        use_vision_dtype(model, pick_vision_dtype(model, device, vision_dtype))
    model.eval()
    return model, processor

