"""Tokenizer and processor files for a tiny model whose source has none (a catalog id: config only).

`mixspec tiny` copies the real files when the source directory has them. When it has none, this
module writes working ones, offline: a small byte-level BPE (trained with ``tokenizers`` on a
built-in corpus) padded with filler entries so that the family's special tokens (image token,
pad/bos/eos, chat markers) land on the ids the config names; the family's chat template; and the
family's image processor (transformers' PIL backend, no torchvision) with the sizes the config
implies (image size, patch size, merge size). The family's own processor class
(``AutoProcessor.from_pretrained``) then loads the directory and expands the image token as it
does for the real model.

A synthesized tokenizer is NOT the real model's tokenizer: text splits into different tokens
(the vocabulary size and the special ids are the real ones, the ordinary tokens are not). It is
for smoke tests of a compiled program only.

What is family knowledge here and cannot be read from a config: the special tokens' strings and
the chat template (published with each checkpoint, not with transformers). Families are keyed by
their processor class (transformers' auto mapping for the config's model_type); a family without
an entry is refused with what to provide.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MixspecError

# the published Qwen2-VL / Qwen2.5-VL / Qwen3-VL special tokens, in id order from the config's bos
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)

# the published Qwen2-VL / Qwen2.5-VL chat template
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the published llava-hf/llava-1.5 chat template
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# the published google/gemma-3 chat template
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A picture shows a red square on a white "
    "background. What is in the image? Describe the colours and shapes you see. The answer is "
    "blue. There are two circles and one triangle. Hello, how are you today? I am fine, thank "
    "you. Count the objects: one, two, three, four, five, six, seven, eight, nine, ten. "
    "user assistant system You are a helpful assistant. 0123456789 !?.,:;'\"()[]{}<>-_/\\|@#$%^&*+=~`"
)

NOTE = ("synthesized offline: NOT the real model's tokenizer (same vocabulary size and special-token ids, "
        "different ordinary tokens, so text is tokenized differently); for smoke tests only")


class TinyProcessorError(MixspecError):
    """No tokenizer/processor can be synthesized for this family."""


def train_bpe(vocab_size: int, pre_tokenizer, specials: tuple[str, ...] = ()):
    """A byte-level BPE trained on the built-in corpus: (vocab dict, merges list)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def pad_vocab(vocab: dict, size: int) -> dict:
    """Fill ids len(vocab)..size-1 with filler entries no merge can produce (so that the
    special tokens added next land on their published ids)."""
    out = dict(vocab)
    next_id = max(out.values()) + 1
    if next_id != len(out):
        raise TinyProcessorError("error: the trained vocabulary's ids are not dense")
    while next_id < size:
        out[f"<filler_{next_id}>"] = next_id
        next_id += 1
    return out


def qwen_tokenizer(first_special: int):
    """Qwen2's tokenizer class over a small BPE; the special tokens from ``first_special`` on."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    vocab, merges = train_bpe(600, pre)
    tok = Qwen2Tokenizer(vocab=pad_vocab(vocab, first_special), merges=merges, errors="replace",
                         model_max_length=32768, clean_up_tokenization_spaces=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def llava_tokenizer(image_token_id: int, pad_token_id: int | None):
    """A Llama-style tokenizer (<unk> <s> </s> first, BOS prepended) over a small BPE, with
    <image> at ``image_token_id`` and <pad> right after it (or at ``pad_token_id``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AddedToken, PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab, merges = train_bpe(600, pre, specials=("<unk>", "<s>", "</s>"))
    vocab = pad_vocab(vocab, image_token_id)
    inner = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    inner.pre_tokenizer = pre
    inner.decoder = decoders.ByteLevel()
    inner.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=4096, clean_up_tokenization_spaces=False)
    added = ["<image>"] + (["<pad>"] if pad_token_id is not None else [])
    if pad_token_id is not None and pad_token_id != image_token_id + 1:
        raise TinyProcessorError(f"error: pad_token_id {pad_token_id} does not follow image_token_index "
                                 f"{image_token_id} as in LLaVA-1.5's tokenizer")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    tok.pad_token = "<pad>" if pad_token_id is not None else "</s>"
    return tok


def placed_tokenizer(placed: dict[int, str], roles: dict[str, str], extra: dict[str, str] | None = None):
    """A BOS-prepending byte-level BPE whose special tokens sit at the given ids (``placed``:
    {id: token}); the trained tokens fill the other ids from 0 up, fillers the rest up to the
    largest placed id. ``roles``: bos/eos/pad/unk -> token; ``extra``: named special tokens
    the family's processor reads from the tokenizer (image_token, boi_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AddedToken, PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained, merges = train_bpe(600, pre)
    free = (t for t, _ in sorted(trained.items(), key=lambda kv: kv[1]))
    vocab = {}
    for i in range(max(placed) + 1):
        token = placed.get(i) or next(free, None) or f"<filler_{i}>"
        vocab[token] = i
    missing = [t for t in free]
    if missing:
        raise TinyProcessorError(f"error: {len(missing)} trained tokens found no free id below {max(placed)}")
    inner = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=roles.get("unk_token")))
    inner.pre_tokenizer = pre
    inner.decoder = decoders.ByteLevel()
    bos = roles["bos_token"]
    inner.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, model_max_length=8192, clean_up_tokenization_spaces=False,
                                  extra_special_tokens=extra or {}, **roles)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in placed.values()], special_tokens=True)
    return tok


def _image_processor_class(model_type: str):
    """The family's PIL image processor class (transformers' auto mapping; no torchvision)."""
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    name = names.get("pil") if isinstance(names, dict) else names
    return get_image_processor_class_from_name(name) if name else None


def _write_qwen(config, out: Path, processor_name: str) -> None:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: Qwen2's tokenizer, the Qwen2-VL image processor at the
    config's patch/merge sizes. transformers cannot build these processors without a video
    processor (torchvision), so the files a published checkpoint has are written as data."""
    text, vision = config.get_text_config(), config.vision_config
    first = getattr(config, "bos_token_id", None) or text.bos_token_id
    tok = qwen_tokenizer(first)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(out)
    side = vision.patch_size * vision.spatial_merge_size  # one merged token's side in pixels
    image_processor = _image_processor_class(config.model_type)(
        min_pixels=side * side, max_pixels=(4 * side) ** 2, patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)
    image_processor.save_pretrained(out)
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(image_processor_type=type(image_processor).__name__.removesuffix("Pil"),
                processor_class=processor_name)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")


def _write_llava(config, out: Path, processor_name: str) -> None:
    """LLaVA: a Llama-style tokenizer, CLIP's image processor at the vision config's image size,
    the processor's image-token count from its patch size (the config's feature strategy)."""
    import transformers

    vision, text = config.vision_config, config.get_text_config()
    tok = llava_tokenizer(config.image_token_index, getattr(config, "pad_token_id", None) or text.pad_token_id)
    size = vision.image_size
    image_processor = _image_processor_class(config.model_type)(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    processor = getattr(transformers, processor_name)(
        image_processor=image_processor, tokenizer=tok, patch_size=vision.patch_size,
        vision_feature_select_strategy=strategy, image_token="<image>", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    tok.save_pretrained(out)


def _gemma_roles(text) -> tuple[dict[int, str], dict[str, str]]:
    """Gemma's <pad> <eos> <bos> at the text config's ids (0, 1, 2 as published)."""
    eos = text.eos_token_id[0] if isinstance(text.eos_token_id, list) else text.eos_token_id
    placed = {text.pad_token_id: "<pad>", eos: "<eos>", text.bos_token_id: "<bos>"}
    return placed, {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}


def _write_gemma3(config, out: Path, processor_name: str) -> None:
    """Gemma 3: turn markers and <start_of_image>/<end_of_image>/<image_soft_token> at the config's
    ids, SigLIP-style image processor at the vision config's image size, mm_tokens_per_image."""
    import transformers

    placed, roles = _gemma_roles(config.get_text_config())
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    placed.update({eos[-1] - 1: "<start_of_turn>", eos[-1]: "<end_of_turn>", config.boi_token_index: "<start_of_image>",
                   config.eoi_token_index: "<end_of_image>", config.image_token_index: "<image_soft_token>"})
    tok = placed_tokenizer(placed, roles, {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                           "eoi_token": "<end_of_image>"})
    size = config.vision_config.image_size
    image_processor = _image_processor_class(config.model_type)(size={"height": size, "width": size})
    processor = getattr(transformers, processor_name)(image_processor=image_processor, tokenizer=tok,
                                                      chat_template=GEMMA3_CHAT_TEMPLATE,
                                                      image_seq_length=config.mm_tokens_per_image)
    processor.save_pretrained(out)
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    tok.save_pretrained(out)


def _write_paligemma(config, out: Path, processor_name: str) -> None:
    """PaliGemma (a prefix LM, no chat template): the <locNNNN>/<segNNN> tokens the processor
    adds (transformers' own list) from the first id after the text vocabulary, <image> after them
    at the config's id, SigLIP's image processor at the vision config's image size."""
    import transformers
    from transformers.models.paligemma import processing_paligemma as pg

    text = config.get_text_config()
    placed, roles = _gemma_roles(text)
    first = config.image_token_index - len(pg.EXTRA_TOKENS)
    placed.update({first + i: t for i, t in enumerate(pg.EXTRA_TOKENS)})
    placed[config.image_token_index] = pg.IMAGE_TOKEN
    tok = placed_tokenizer(placed, roles)
    size = config.vision_config.image_size
    image_processor = _image_processor_class(config.model_type)(size={"height": size, "width": size})
    image_processor.image_seq_length = text.num_image_tokens
    processor = getattr(transformers, processor_name)(image_processor=image_processor, tokenizer=tok)
    processor.save_pretrained(out)
    tok.save_pretrained(out)


# family -> writer, keyed by transformers' processor class for the config's model_type
WRITERS = {"Qwen2VLProcessor": _write_qwen, "Qwen2_5_VLProcessor": _write_qwen,
           "Qwen3VLProcessor": _write_qwen, "LlavaProcessor": _write_llava, "Gemma3Processor": _write_gemma3,
           "PaliGemmaProcessor": _write_paligemma}


def processor_name(model_type: str) -> str | None:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def write_processor(config, out: Path) -> list[str]:
    """Write synthesized tokenizer/processor files for ``config``'s family into ``out``; the
    names written. Raises TinyProcessorError for a family it has no recipe for."""
    name = processor_name(config.model_type)
    writer = WRITERS.get(name)
    if writer is None:
        what = f"processor {name}" if name else "tokenizer"
        raise TinyProcessorError(
            f"error: cannot synthesize the {what} files of a {config.model_type} model offline "
            f"(mixspec tiny knows {', '.join(sorted(WRITERS))})\n"
            "  hint: give mixspec tiny a model directory that has the tokenizer/processor files (no weights "
            "needed: hf download MODEL --exclude '*.safetensors' '*.bin'), or copy them into the tiny model's "
            "directory")
    before = {p.name for p in out.iterdir()}
    try:
        writer(config, out, name)
    except Exception as exc:  # noqa: BLE001  (a config this recipe does not fit: no half-written files)
        for path in out.iterdir():
            if path.name not in before and path.is_file():
                path.unlink()
        why = str(exc).strip().splitlines()[0].removeprefix("error: ") if str(exc).strip() else ""
        why = why if isinstance(exc, TinyProcessorError) else f"{type(exc).__name__}: {why}"
        raise TinyProcessorError(
            f"error: cannot synthesize the {name} files of this {config.model_type} config: {why}\n"
            "  hint: give mixspec tiny a model directory that has the tokenizer/processor files") from None
    return sorted(p.name for p in out.iterdir() if p.name not in before)


def load_problem(out: Path) -> str | None:
    """Why transformers cannot load the written processor here (None when it loads): the
    Qwen-VL processors need torchvision for their video processor, as the real ones do."""
    import transformers

    try:
        transformers.AutoProcessor.from_pretrained(out)
    except Exception as exc:  # noqa: BLE001  (whatever transformers raises is the answer)
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        return f"{type(exc).__name__}: {first.rstrip('.')}"
    return None
