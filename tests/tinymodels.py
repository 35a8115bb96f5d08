"""Tiny random models of real architectures, for tests that need real module trees.

``tiny_config(model_type)`` shrinks a real configuration (a catalog config, or the
transformers defaults of that model_type) to a few hundred thousand parameters while
keeping the structure that matters to mixspec: the same classes, module names, tied or
untied embeddings, the aligner inside or beside the vision tower, Conv3d patch embeddings,
LLaVA-NeXT's ``image_newline`` parameter, Mllama's cross-attention layers, ...

``write_config_dir(config, path)`` saves it as a model directory holding config.json only
(what a user points a spec at), and ``build_model(config)`` instantiates the real
transformers class on CPU with random weights, e.g. to hand to PEFT.

    cfg = tiny_config("qwen2_5_vl")
    model = build_model(cfg)             # Qwen2_5_VLForConditionalGeneration, ~0.3M params
    path = write_config_dir(cfg, tmp_path / "qwen")

Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

TEXT_DIM = 32  # LLM width
VISION_DIM = 48  # vision encoder width, different from TEXT_DIM so a swapped in/out shows
VOCAB = 256

# Sizes of every LLM (the text_config, or the top level of a flat config).
_TEXT = {
    "vocab_size": VOCAB, "hidden_size": TEXT_DIM, "intermediate_size": 80,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "max_position_embeddings": 512, "max_window_layers": 2,
}
# Keys whose value is derived from the sizes above, so the config class rebuilds them.
_TEXT_DROP = ("layer_types", "sliding_window_pattern", "_sliding_window_pattern")

_CLIP_LIKE = {"hidden_size": VISION_DIM, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


@dataclass(frozen=True)
class Family:
    """How to shrink one model_type: the class to build and the overrides per config part."""

    architecture: str
    vision: dict = field(default_factory=dict)  # set in vision_config
    text: dict = field(default_factory=dict)  # set where the LLM sizes live, after _TEXT
    top: dict = field(default_factory=dict)  # set at the top level, last
    vision_drop: tuple = ()
    multimodal: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", multimodal=False),
    "qwen2": Family("Qwen2ForCausalLM", multimodal=False),
    "qwen2_vl": Family(
        "Qwen2VLForConditionalGeneration",
        # hidden_size here is the merger's output, i.e. the LLM width
        vision={"depth": 2, "embed_dim": VISION_DIM, "num_heads": 4, "mlp_ratio": 2,
                "hidden_size": TEXT_DIM, "patch_size": 8, "spatial_patch_size": 8},
    ),
    "qwen2_5_vl": Family(
        "Qwen2_5_VLForConditionalGeneration",
        vision={"depth": 2, "hidden_size": VISION_DIM, "intermediate_size": 96, "num_heads": 4,
                "out_hidden_size": TEXT_DIM, "patch_size": 8, "spatial_patch_size": 8,
                "window_size": 32, "fullatt_block_indexes": [1]},
    ),
    "qwen3_vl": Family(
        "Qwen3VLForConditionalGeneration",
        vision={"depth": 3, "hidden_size": VISION_DIM, "intermediate_size": 96, "num_heads": 4,
                "out_hidden_size": TEXT_DIM, "patch_size": 8, "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0, 1]},
    ),
    "llava": Family("LlavaForConditionalGeneration", vision={**_CLIP_LIKE, "projection_dim": 24}),
    "llava_next": Family(
        "LlavaNextForConditionalGeneration", vision={**_CLIP_LIKE, "projection_dim": 24},
        top={"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32]]},
    ),
    "llava_onevision": Family(
        "LlavaOnevisionForConditionalGeneration", vision=dict(_CLIP_LIKE),
        top={"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32]]},
    ),
    "gemma3": Family(
        "Gemma3ForConditionalGeneration", vision=dict(_CLIP_LIKE),
        text={"query_pre_attn_scalar": 8, "sliding_window": 16},
        top={"mm_tokens_per_image": 4, "boi_token_index": 250, "eoi_token_index": 251,
             "image_token_index": 252},
    ),
    "paligemma": Family(
        "PaliGemmaForConditionalGeneration",
        vision={**_CLIP_LIKE, "projection_dim": TEXT_DIM, "num_image_tokens": 16, "num_positions": 16},
        text={"query_pre_attn_scalar": 8, "sliding_window": 16, "num_image_tokens": 16},
        top={"hidden_size": TEXT_DIM, "projection_dim": TEXT_DIM, "vocab_size": VOCAB,
             "_vocab_size": VOCAB, "image_token_index": 252},
    ),
    "mllama": Family(
        "MllamaForConditionalGeneration",
        vision={"hidden_size": VISION_DIM, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_global_layers": 1, "attention_heads": 4, "image_size": 32, "patch_size": 8,
                "max_num_tiles": 2, "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
                "intermediate_layers_indices": [0],
                # the final hidden state and one intermediate layer are concatenated
                "vision_output_dim": 2 * VISION_DIM},
        text={"num_hidden_layers": 3, "cross_attention_layers": [1]},
        top={"image_token_index": 252},
    ),
    "idefics3": Family("Idefics3ForConditionalGeneration", vision=dict(_CLIP_LIKE),
                       top={"image_token_id": 252}),
    "smolvlm": Family("SmolVLMForConditionalGeneration", vision=dict(_CLIP_LIKE),
                      top={"image_token_id": 252}),
    "internvl": Family(
        "InternVLForConditionalGeneration",
        vision={"hidden_size": VISION_DIM, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "image_size": [32, 32], "patch_size": [8, 8]},
        top={"image_token_id": 252},
    ),
    "mistral3": Family(
        "Mistral3ForConditionalGeneration",
        vision={**_CLIP_LIKE, "head_dim": VISION_DIM // 4},
        top={"image_token_index": 10},
    ),
}


def families() -> list[str]:
    return sorted(FAMILIES)


def default_config(model_type: str) -> dict:
    """The transformers defaults of a model_type, as a config.json would hold them."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]().to_dict()


def _shrink_mrope(node) -> None:
    """Qwen's multimodal rotary sections must add up to head_dim / 2 (4 at tiny size)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "mrope_section" and isinstance(value, list) and len(value) == 3:
                node[key] = [2, 1, 1]
            else:
                _shrink_mrope(value)


def tiny_config(model_type: str, base: dict | None = None) -> dict:
    """A tiny config of ``model_type`` built from ``base`` (a real config.json, e.g. from the
    catalog) or, without one, from the transformers defaults. Same structure, tiny sizes."""
    family = FAMILIES[model_type]
    cfg = copy.deepcopy(base) if base is not None else default_config(model_type)
    if cfg.get("model_type") != model_type:
        raise ValueError(f"base config is a {cfg.get('model_type')!r}, not a {model_type!r}")
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    for key in _TEXT_DROP:
        text.pop(key, None)
    text.update(_TEXT)
    text.update(family.text)
    for part in (cfg, text):  # special tokens must lie inside the tiny vocabulary
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = part.get(key)
            if isinstance(value, int) and value >= VOCAB:
                part[key] = VOCAB - 1
            elif isinstance(value, list):
                part[key] = [v if v < VOCAB else VOCAB - 1 for v in value]
    if family.multimodal:
        vision = cfg.setdefault("vision_config", {})
        for key in family.vision_drop:
            vision.pop(key, None)
        vision.update(family.vision)
    cfg.update(family.top)
    _shrink_mrope(cfg)
    cfg["architectures"] = [family.architecture]
    for key in ("transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        cfg.pop(key, None)
    return cfg


def write_config_dir(config: dict, path: str | Path) -> Path:
    """A model directory holding only config.json (what mixspec reads for a local model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def build_model(config: dict, seed: int = 0):
    """The real transformers model class of ``config`` on CPU, float32, random weights."""
    import warnings

    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = CONFIG_MAPPING[config["model_type"]].from_dict(copy.deepcopy(config))
        cls = getattr(transformers, config["architectures"][0])
        torch.manual_seed(seed)
        model = cls._from_config(cfg, dtype=torch.float32)
    return model.eval()
