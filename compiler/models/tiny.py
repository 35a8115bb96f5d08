"""`mixspec tiny MODEL OUT_DIR`: a random tiny model of MODEL's family, to smoke-test a compiled
program end to end on a CPU before renting GPUs.

What comes in: a model (catalog id, cached hub id or local directory). What goes out: a model
directory with the same architecture, the same module names (fewer blocks) and the same roles,
random weights (seed 0, float32), and, where the source directory has them, its
tokenizer/processor files copied unchanged (so the vocabulary keeps its real size); where it has
none (a catalog id), stand-in files synthesized offline (mixspec.models.tiny_processor).

How it shrinks, for every sub-config transformers builds (text, vision, audio, ...), by the
meaning of the keys rather than a list per family:
- blocks: ``num_hidden_layers`` / ``depth`` / ``num_layers`` to ``layers`` (2); lists of layer
  indices (``fullatt_block_indexes``, ``deepstack_visual_indexes``, ...) keep the indices
  below the new count (or the last block), per-layer lists (``layer_types``) their first
  entries;
- width: the head size stays (rotary sections, ``head_dim`` and scaling rules keep holding), the
  heads drop to 2 (key/value heads to 1 where they were grouped), so the hidden size becomes
  2 x head size; every other integer of the whole config that equalled an old hidden size
  (a projector's input, a merger's output, ``out_hidden_size``) follows it; MLP sizes become
  2 x the new hidden size.
The result is built with transformers (``from_config``) and run on one short text batch before
anything is written; a family this does not shrink to a working model is refused, naming
what transformers said.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import tiny_processor
from ..errors import MixspecError

LAYER_KEYS = ("num_hidden_layers", "depth", "num_layers", "encoder_layers", "decoder_layers")
HEAD_KEYS = ("num_attention_heads", "num_heads")
# embed_dim first: Qwen2-VL's vision tower is embed_dim wide, its hidden_size is the merger's output
WIDTH_KEYS = ("embed_dim", "hidden_size", "d_model")
MLP_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")
# files a tokenizer / processor is loaded from (copied as they are; never weights)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")


class TinyError(MixspecError):
    """The model cannot be shrunk to a working tiny copy."""


def _sub_configs(config) -> list:
    """The config and every nested PretrainedConfig (text_config, vision_config, ...)."""
    from transformers import PretrainedConfig

    out, todo = [], [config]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += [v for v in vars(c).values() if isinstance(v, PretrainedConfig)]
    return out


def _shrink_layers(c, layers: int) -> None:
    for key in LAYER_KEYS:
        old = getattr(c, key, None)
        if isinstance(old, int) and not isinstance(old, bool) and old > layers:
            setattr(c, key, layers)
            for name, value in list(vars(c).items()):
                if not isinstance(value, list) or not value:
                    continue
                if len(value) == old:  # one entry per layer
                    setattr(c, name, value[:layers])
                elif all(isinstance(v, int) and not isinstance(v, bool) for v in value) and max(value) < old \
                        and any(w in name for w in ("index", "indices", "layers")):
                    kept = [v for v in value if v < layers]
                    setattr(c, name, kept or [layers - 1])
            for name in ("max_window_layers",):
                if isinstance(getattr(c, name, None), int) and getattr(c, name) > layers:
                    setattr(c, name, layers)


def _shrink_width(c, heads: int) -> dict[int, int]:
    """Fewer heads of the same size in one sub-config; {old hidden: new hidden}."""
    head_key = next((k for k in HEAD_KEYS if isinstance(getattr(c, k, None), int)), None)
    width_key = next((k for k in WIDTH_KEYS if isinstance(getattr(c, k, None), int)), None)
    if head_key is None or width_key is None:
        return {}
    old_heads, old_width = getattr(c, head_key), getattr(c, width_key)
    if old_heads <= heads:
        return {}
    head_dim = getattr(c, "head_dim", None) or old_width // old_heads
    kv = getattr(c, "num_key_value_heads", None)
    setattr(c, head_key, heads)
    if isinstance(kv, int):
        c.num_key_value_heads = heads if kv == old_heads else 1
    new_width = head_dim * heads
    mapping = {old_width: new_width}
    setattr(c, width_key, new_width)
    for key in MLP_KEYS:
        if isinstance(getattr(c, key, None), int):
            setattr(c, key, 2 * new_width)
    return mapping


def _follow(config, mapping: dict[int, int]) -> None:
    """Every other integer size equal to an old hidden size takes the new one."""
    for c in _sub_configs(config):
        for name, value in list(vars(c).items()):
            if isinstance(value, int) and not isinstance(value, bool) and value in mapping \
                    and any(w in name for w in ("hidden", "dim", "size")) and not name.startswith("vocab") \
                    and name not in ("image_size", "patch_size", "max_position_embeddings"):
                setattr(c, name, mapping[value])


def tiny_config(config, layers: int = 2, heads: int = 2):
    """A shrunk copy of a transformers config (see the module docstring)."""
    import copy

    config = copy.deepcopy(config)
    mapping: dict[int, int] = {}
    for c in _sub_configs(config):
        _shrink_layers(c, layers)
        mapping.update(_shrink_width(c, heads))
    _follow(config, mapping)
    for c in _sub_configs(config):
        for key in ("torch_dtype", "dtype"):
            if hasattr(c, key):
                setattr(c, key, "float32")
    return config


def _smoke(model, config) -> None:
    """One forward pass on a short text batch: the tiny model runs."""
    import torch

    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, min(vocab, 1000), (1, 8))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def make_tiny(source_dir: Path, out_dir: Path, layers: int = 2, trust_remote_code: bool = False) -> dict:
    """Write the tiny model of ``source_dir`` (a directory with config.json) into ``out_dir``;
    returns {"architecture", "params", "copied": [processor files]}. Raises TinyError."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(source_dir, trust_remote_code=trust_remote_code)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise TinyError(f"error: {source_dir}: architecture {arch!r} is not a transformers class\n"
                        "  hint: mixspec tiny builds models transformers itself defines")
    tiny = tiny_config(config, layers=layers)
    torch.manual_seed(0)
    try:
        model = cls._from_config(tiny)  # float32: tiny_config sets the dtype
        model.eval()
        _smoke(model, tiny)
    except Exception as exc:  # noqa: BLE001  (any failure of the family's own code is the answer)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TinyError(f"error: cannot shrink {arch} to a working tiny model: {type(exc).__name__}: {first}\n"
                        "  hint: build a tiny copy by hand (a config.json with fewer layers and a smaller "
                        "hidden size) and save it with transformers' save_pretrained") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    copied = [name for name in PROCESSOR_FILES if (source_dir / name).is_file()]
    for name in copied:
        shutil.copy(source_dir / name, out_dir / name)
    # generation_config.json alone is no tokenizer: synthesize unless a tokenizer/processor file came
    has_processor = any(name != "generation_config.json" for name in copied)
    synthesized, missing = _synthesize(tiny, out_dir) if not has_processor else ([], None)
    (out_dir / "mixspec_tiny.json").write_text(json.dumps(
        {"source": str(source_dir), "layers": layers, "note": "random weights: for smoke tests only",
         "copied": copied, "synthesized": synthesized,
         **({"tokenizer": tiny_processor.NOTE} if synthesized else {})}, indent=2) + "\n")
    return {"architecture": arch, "params": sum(p.numel() for p in model.parameters()), "copied": copied,
            "synthesized": synthesized, "missing": missing}


def _synthesize(config, out_dir: Path) -> tuple[list[str], str | None]:
    """Synthesized tokenizer/processor files (the source has none): (names written, None), or
    ([], why not) for a family with no offline recipe (the model itself is still complete)."""
    try:
        written = tiny_processor.write_processor(config, out_dir)
    except tiny_processor.TinyProcessorError as exc:
        return [], str(exc)
    problem = tiny_processor.load_problem(out_dir)
    if problem:  # the files are right; this environment lacks what the family's processor imports
        return written, (f"AutoProcessor cannot load {out_dir} in this environment ({problem}): "
                         "rows with images fail here, text rows work")
    return written, None
