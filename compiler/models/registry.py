"""Architecture roles: which modules of a model are its vision encoder, aligner, LLM, ...

Roles are found on the tree actually built, by attribute name, never by hard-coded full
names: transformers 4.52 moved Qwen2-VL's LLM from ``model.*`` to ``model.language_model.*``
and the same rules find both. Roles are made disjoint by the longest matching prefix:
``model.visual.merger`` (aligner) beats ``model.visual`` (vision), and the input embedding
beats the LLM that contains it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .names import shallowest
from .tree import ModuleTree

# attribute names (the last segment of a module or parameter name) that mark each role
VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder", "vpm",
                "image_tower", "video_tower")
ALIGNER_NAMES = ("merger", "deepstack_merger_list", "multi_modal_projector", "connector",
                 "mm_projector", "aligner", "vision_resampler", "image_newline", "resampler", "mlp1",
                 "projector", "patch_merger", "vision_projection", "visual_projection", "vision_adapter",
                 "image_to_text_projection", "language_projection", "qformer", "query_tokens",
                 "perceiver_resampler", "resampler_model", "visual_embeddings_table")
LANGUAGE_NAMES = ("language_model", "text_model", "llm")
AUDIO_NAMES = ("audio_tower", "audio_model", "audio_encoder")

# Families whose roles mixspec's tests check on a real tree. Others are guessed with a warning.
KNOWN_MULTIMODAL = {
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next",
    "llava_next_video", "llava_onevision", "gemma3", "paligemma", "mllama", "idefics2",
    "idefics3", "smolvlm", "internvl", "mistral3", "got_ocr2", "cohere2_vision", "lfm2_vl",
    "aya_vision", "deepseek_vl", "glm4v",
}


@dataclass(frozen=True)
class Roles:
    """Role -> module (or parameter) prefixes, plus a per-name role lookup."""

    prefixes: dict  # role -> tuple of prefixes
    guessed: bool

    def role_of(self, name: str) -> str | None:
        """The role of a module or parameter name: the role of its longest matching prefix."""
        best, best_len = None, -1
        for role, prefixes in self.prefixes.items():
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = role, len(prefix)
        return best


def find_roles(tree: ModuleTree) -> Roles:
    """Compute the role prefixes of a tree."""
    module_names = [m.name for m in tree.modules if m.name]
    param_names = list(tree.param_shapes)

    def by_attr(attrs, include_params=False) -> list[str]:
        found = [n for n in module_names if n.rsplit(".", 1)[-1] in attrs]
        if include_params:
            found += [p for p in param_names if p.rsplit(".", 1)[-1] in attrs]
        return found

    prefixes: dict[str, tuple[str, ...]] = {}
    vision = shallowest(by_attr(VISION_NAMES))
    if vision:
        prefixes["vision"] = vision
    aligner = by_attr(ALIGNER_NAMES, include_params=True)
    language = named_language = shallowest(by_attr(LANGUAGE_NAMES))
    if not language and tree.is_causal_lm_only and tree.base_model_prefix in module_names:
        language = (tree.base_model_prefix,)
    if not language and "." in tree.input_embedding:
        # no attribute names the LLM (Qwen2-VL before transformers 4.52: visual.*, model.*;
        # BLIP: text_decoder.bert.embeddings.word_embeddings): the LLM is the outermost module
        # above the input embeddings that holds no vision, audio or aligner module; failing
        # that (one ``model`` holding them all), the embeddings' owner, minus the roles in it
        others = (*vision, *by_attr(AUDIO_NAMES), *by_attr(ALIGNER_NAMES, include_params=True))
        parts = tree.input_embedding.split(".")
        owners = [".".join(parts[:depth]) for depth in range(1, len(parts))]
        clean = [o for o in owners if o in module_names
                 and not any(x == o or x.startswith(o + ".") or o.startswith(x + ".") for x in others)]
        owner = owners[-1]
        if clean:
            language = (clean[0],)
        elif owner in module_names and not any(owner == v or owner.startswith(v + ".") for v in vision):
            language = (owner,)
    # an aligner is a projector between vision and the LLM: never one nested in a module named
    # as the LLM (a fallback LLM prefix such as ``model`` may hold the projector: keep it)
    aligner = [a for a in aligner if not any(a.startswith(l + ".") for l in named_language)]
    if aligner:
        prefixes["aligner"] = shallowest(aligner)
    if language:
        prefixes["language"] = language
    audio = shallowest(by_attr(AUDIO_NAMES))
    if audio:
        prefixes["audio"] = audio
    if tree.input_embedding:
        prefixes["embeddings"] = (tree.input_embedding,)
    if tree.output_embedding:
        prefixes["lm_head"] = (tree.output_embedding,)
    multimodal = bool(vision or audio)
    guessed = multimodal and tree.model_type not in KNOWN_MULTIMODAL
    if not multimodal and not tree.is_causal_lm_only:
        guessed = True
    return Roles(prefixes, guessed)
