"""What a demo-family model is made of: SmolVLM's chat template, a byte-level BPE tokenizer trained
on the shapes world, the Idefics3 processor and config, generation defaults, and chat messages.

Invariants:
- Built only from local code and a seed: no hub access. The same seed gives the same tokenizer.
- The classes are SmolVLM's (Idefics3 with a Llama text model), so a model made from these parts
  loads through the same `AutoModelForImageTextToText` / `AutoProcessor` path as a hub model.
- The chat template is SmolVLM's: content is always a list of parts.
- Greedy decoding is the saved default; sampling arguments are left unset, not zeroed.
"""
from __future__ import annotations

import random

from chatapp.demo import shapes

CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<end_of_utterance>", "<pad>", "<image>", "<fake_token_around_image>",
                  "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SYSTEM_PROMPTS = ["", "", "You are a helpful assistant.", "You answer questions about images."]
DEMO_IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (DEMO_IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR ** 2  # 16 tokens per image
MAX_CONTEXT = 1024


def tokenizer_corpus(rng: random.Random, n: int = 4000) -> list[str]:
    texts = []
    for _ in range(n):
        ex = shapes.random_example(rng)
        texts.append(f"User: {ex.question}")
        texts.append(f"Assistant: {ex.answer}")
    for p in SYSTEM_PROMPTS:
        texts.append(f"System: {p}")
    for qtype, forms in shapes.QUESTION_FORMS.items():
        texts.extend(forms)
    for style in shapes.STYLES:
        texts.append(shapes.answer("capabilities", style, None))
    return texts


def build_tokenizer(rng: random.Random, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(rng), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=MAX_CONTEXT,
        padding_side="left",
    )


def build_processor(tokenizer, image_size: int = DEMO_IMAGE_SIZE, image_seq_len: int = IMAGE_SEQ_LEN,
                    do_image_splitting: bool = False, max_image_size: int | None = None):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size * (4 if do_image_splitting else 1)},
        max_image_size={"longest_edge": max_image_size or image_size},
        do_image_splitting=do_image_splitting,
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                             image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)


def model_config(tokenizer, *, text_hidden: int, text_layers: int, text_heads: int, text_kv_heads: int,
                 text_intermediate: int, vision_hidden: int, vision_layers: int, vision_heads: int,
                 vision_intermediate: int, image_size: int, patch_size: int, scale_factor: int,
                 max_context: int = MAX_CONTEXT, tie_embeddings: bool = False, vocab_size: int | None = None):
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    vocab = max(vocab_size or 0, len(tokenizer))
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=text_hidden, intermediate_size=text_intermediate,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
        max_position_embeddings=max_context, rms_norm_eps=1e-5, tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = Idefics3VisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
    )
    config = Idefics3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie_embeddings)
    return config


def set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = 64
    for name in ("temperature", "top_k", "top_p"):
        setattr(gc, name, None)



def chat_messages(example: shapes.Example, system: str = "") -> list[dict]:
    """The prompt of a one-question chat: an optional system message, then the user turn with the
    image part (when the example has a scene) before the question."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    user = ([{"type": "image"}] if example.scene is not None else []) + [{"type": "text", "text": example.question}]
    messages.append({"role": "user", "content": user})
    return messages

