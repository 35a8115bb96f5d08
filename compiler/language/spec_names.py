"""Names of the spec language that code outside pydantic needs (the loader, the light check)."""

ROLES = ("vision", "aligner", "language", "lm_head", "embeddings", "audio")

# the words other frameworks and papers use for a role (ms-swift's vit/aligner/llm, LLaVA's
# mm_projector, ...): a component named so gets "did you mean the role ...?"
ROLE_SYNONYMS = {
    **dict.fromkeys(("visual", "vit", "vision_tower", "vision_model", "vision_encoder", "image_encoder",
                     "encoder", "visual_encoder", "siglip", "clip"), "vision"),
    **dict.fromkeys(("projector", "mm_projector", "multi_modal_projector", "merger", "connector", "adapter",
                     "mlp_projector", "proj", "resampler", "abstractor"), "aligner"),
    **dict.fromkeys(("llm", "lm", "text", "text_model", "language_model", "decoder", "backbone", "transformer"),
                    "language"),
    **dict.fromkeys(("head", "output", "output_layer", "lmhead"), "lm_head"),
    **dict.fromkeys(("embed", "embedding", "embed_tokens", "wte", "tok_embeddings"), "embeddings"),
    **dict.fromkeys(("audio_tower", "audio_encoder", "whisper"), "audio"),
}
TRAIN_MODES = ("freeze", "full", "lora")
COMPONENT_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$"
