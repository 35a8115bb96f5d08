"""Find a model's config.json offline: catalog, local dir, Hugging Face cache, ModelScope cache.

Nothing here touches the network or imports model code. A config that needs the model
repo's own code (``auto_map``) is refused unless the user opted in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelSourceError

MAX_CONFIG_BYTES = 5_000_000


@dataclass(frozen=True)
class ModelSource:
    """Where a model's config was found, and the config itself."""

    ref: str
    kind: str  # catalog | local | hf-cache | modelscope-cache
    path: str  # the directory holding config.json
    config: dict

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def refuse_quantized(self) -> None:
        """A pre-quantized checkpoint (AWQ, GPTQ, bitsandbytes, FP8, ...) holds other tensors
        than the model class built from its config (packed qweight/qzeros/scales, 4-bit
        storage): the Plan's names, counts and memory would not be the run's, and no part of
        it can be trained fully. Refused, never planned as if unquantized."""
        text = self.config.get("text_config")
        quant = self.config.get("quantization_config") or (
            text.get("quantization_config") if isinstance(text, dict) else None)
        if not quant:
            return
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        bits = (quant.get("bits") or quant.get("w_bit")) if isinstance(quant, dict) else None
        raise ModelSourceError(
            f"model {self.ref!r}: config.json has a quantization_config (quant_method {method!r}"
            + (f", {bits} bits" if bits else "") + "): a pre-quantized checkpoint holds other tensors than "
            "the model mixspec plans (packed weights, scales), so the Plan's names, counts and memory would "
            "not be the run's, and its quantized layers cannot be trained fully\n"
            "  hint: point model at the unquantized (bf16/fp16) checkpoint of this model")


def catalog_root() -> Path:
    """The catalog's directory (a plain package directory: its configs are package data)."""
    from . import catalog

    return Path(catalog.__file__).parent


def catalog_ids() -> list[str]:
    """Model ids shipped with mixspec."""
    root = catalog_root()
    return sorted(
        str(p.parent.relative_to(root)).replace(os.sep, "/") for p in root.glob("*/*/config.json")
    )


def catalog_entries() -> list[dict]:
    """Each catalog model: id, model_type, architecture and parameter count (from its module
    tree, built on the meta device and cached; None where the tree cannot be built here)."""
    import json

    from ..errors import MixspecError

    out = []
    root = catalog_root()
    for model_id in catalog_ids():
        config = json.loads((root / model_id / "config.json").read_text(encoding="utf-8"))
        try:
            from .tree import get_tree

            params = get_tree(find_model(model_id)).total_params
        except (MixspecError, ImportError):
            params = None
        out.append({"id": model_id, "model_type": config.get("model_type", "?"),
                    "architecture": (config.get("architectures") or ["?"])[0], "params": params})
    return out


def _hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps models, by its own rule: HF_HUB_CACHE, then
    HUGGINGFACE_HUB_CACHE, then HF_HOME/hub, with HF_HOME defaulting to
    $XDG_CACHE_HOME/huggingface (XDG_CACHE_HOME defaults to ~/.cache). The rule is read
    from the environment at each lookup; huggingface_hub's own answer (fixed when it was
    imported, ~5 ms, only after a catalog miss) is added when it is installed and differs."""

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    env = os.environ
    hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    hub_cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(hf_home, "hub")
    dirs = [expand(hub_cache)]
    try:
        from huggingface_hub import constants
    except ImportError:  # plain `pip install mixspec` has no huggingface_hub: the rule above suffices
        pass
    else:
        dirs.append(expand(str(constants.HF_HUB_CACHE)))
    return list(dict.fromkeys(dirs))


def _modelscope_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("MODELSCOPE_CACHE"):
        root = Path(os.environ["MODELSCOPE_CACHE"])
        dirs += [root / "models", root / "hub", root]
    home = Path.home() / ".cache" / "modelscope" / "hub"
    dirs += [home / "models", home]
    return list(dict.fromkeys(dirs))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or ref in (".", "..")


def _hf_snapshot(cache: Path, ref: str) -> Path | None:
    repo = cache / ("models--" + ref.replace("/", "--"))
    if not repo.is_dir():
        return None
    main = repo / "refs" / "main"
    if main.is_file():
        commit = main.read_text(encoding="utf-8", errors="replace").strip()
        snap = repo / "snapshots" / commit
        if (snap / "config.json").is_file():
            return snap
    snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


def read_config(config_path: Path, ref: str) -> dict:
    """Read config.json as data, with clear errors for everything that can go wrong."""
    try:
        if config_path.is_dir():
            raise ModelSourceError(f"model {ref!r}: {config_path} is a directory, expected a config.json file")
        if not config_path.is_file():
            if config_path.exists():
                raise ModelSourceError(f"model {ref!r}: {config_path} is not a regular file (a pipe or a device?), "
                                       "expected a config.json file")
            if config_path.is_symlink():
                raise ModelSourceError(f"model {ref!r}: {config_path} is a symlink to nothing (or to itself), "
                                       "expected a config.json file")
            raise ModelSourceError(f"model {ref!r}: no config.json in {config_path.parent}",
                                   "give a model directory that holds the checkpoint's config.json (no weights "
                                   "needed), a catalog id (mixspec models) or a Hugging Face / ModelScope id "
                                   "whose files are in the local cache")
        if config_path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelSourceError(f"model {ref!r}: {config_path} is larger than {MAX_CONFIG_BYTES} bytes; not a config")
        raw = config_path.read_bytes()
    except OSError as exc:
        raise ModelSourceError(f"model {ref!r}: cannot read {config_path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:  # it grew after the stat (a file being written, a pipe)
        raise ModelSourceError(f"model {ref!r}: {config_path} is larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"model {ref!r}: {config_path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ModelSourceError(f"model {ref!r}: {config_path} nests too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"model {ref!r}: {config_path} must hold a JSON object")
    return config


def find_model(ref: str, base_dir: str | Path | None = None) -> ModelSource:
    """Resolve a model reference to its config, offline. Raises ModelSourceError listing where it looked."""
    try:
        return _find_model(ref, base_dir)
    except OSError as exc:  # a name too long for the OS, an unreadable cache directory, ...
        shown = ref if len(ref) <= 200 else ref[:197] + "..."
        raise ModelSourceError(
            f"model {shown!r}: cannot look it up: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and len(str(exc.filename)) <= 300 else "")
        ) from None


def _find_model(ref: str, base_dir: str | Path | None) -> ModelSource:
    looked: list[str] = []
    # 1. a local directory (relative paths are taken from the spec's directory, then the cwd)
    candidates = []
    expanded = os.path.expanduser(ref)
    if os.path.isabs(expanded):
        candidates.append(Path(expanded))
    else:
        if base_dir is not None:
            candidates.append(Path(base_dir) / expanded)
        candidates.append(Path.cwd() / expanded)
    for cand in candidates:
        looked.append(f"local directory {cand}")
        if cand.is_dir():
            cand = cand.resolve()
            return ModelSource(ref, "local", str(cand), read_config(cand / "config.json", ref))
        if cand.is_file():
            raise ModelSourceError(
                f"model {ref!r}: {cand} is a file; give the directory that holds config.json"
            )
    if _looks_like_path(ref):
        raise ModelSourceError(f"model {ref!r}: no such directory. Looked in:\n  " + "\n  ".join(looked))
    if any(part in ("", ".", "..") for part in ref.split("/")):
        # ids are ORG/NAME; never let '..' walk out of the catalog or a cache directory
        raise ModelSourceError(f"model {ref!r}: not a model id (ORG/NAME) and no such directory")
    # 2. the built-in catalog
    root = catalog_root()
    cat = root / ref
    looked.append(f"mixspec catalog ({len(catalog_ids())} models: mixspec models)")
    if ref.count("/") == 1 and (cat / "config.json").is_file():
        return ModelSource(ref, "catalog", str(cat), read_config(cat / "config.json", ref))
    # 3. Hugging Face cache, 4. ModelScope cache
    if ref.count("/") == 1:
        for cache in _hf_cache_dirs():
            looked.append(f"Hugging Face cache {cache}")
            snap = _hf_snapshot(cache, ref)
            if snap is not None:
                return ModelSource(ref, "hf-cache", str(snap), read_config(snap / "config.json", ref))
        for cache in _modelscope_cache_dirs():
            looked.append(f"ModelScope cache {cache}")
            for cand in (cache / ref, cache / ref.replace(".", "___")):
                if (cand / "config.json").is_file():
                    return ModelSource(ref, "modelscope-cache", str(cand), read_config(cand / "config.json", ref))
    import difflib

    close = difflib.get_close_matches(ref, catalog_ids(), n=3, cutoff=0.6)
    raise ModelSourceError(
        f"model {ref!r} not found (mixspec never downloads). Looked in:\n  "
        + "\n  ".join(looked)
        + (f"\n  did you mean {' or '.join(repr(c) for c in close)} (in the catalog)?" if close else "")
        + "\n  hint: use a catalog id (mixspec models), a local directory with config.json, "
        "or download the model's config into your Hugging Face cache first"
    )
