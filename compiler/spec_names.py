"""Names of the spec language that code outside pydantic needs (the loader, the light check)."""

ROLES = ("vision", "aligner", "language", "lm_head", "embeddings", "audio")
TRAIN_MODES = ("freeze", "full", "lora")
COMPONENT_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$"
