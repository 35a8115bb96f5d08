"""ModuleTree: a model's modules, types and parameter shapes, built on the meta device.

``build_tree(source)`` instantiates the real transformers class from the config on
PyTorch's meta device (no weights, no download, no remote code) and records what the
resolver and the estimator need. Trees are cached on disk as JSON, keyed by the config's
content, the transformers and torch versions, the tree format, a hash of this module's
source and, for remote-code builds, of the model repo's Python files, so a warm plan never
imports torch or transformers and never reads a tree built by other code.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import ModelSourceError
from .sources import ModelSource

TREE_FORMAT = 2

# module kinds PEFT's LoRA can wrap, and how mixspec counts their adapters
LINEAR, CONV1D_GPT2, EMBEDDING, CONV = "linear", "conv1d_gpt2", "embedding", "conv"
LORA_KINDS = (LINEAR, CONV1D_GPT2, EMBEDDING, CONV)

# normalisation modules (their parameters get no weight decay): a torch.nn.LayerNorm
# instance (transformers' own no-decay rule looks for exactly that class), or any other norm
NORM_TORCH_LAYERNORM, NORM_OTHER = "layernorm", "norm"
_NORM_CLASS_NAME = re.compile(r"Norm(?:[123]d)?$")


@dataclass(frozen=True)
class ModuleInfo:
    """One module: its full name, class, LoRA-relevant kind and its own (direct) parameters."""

    name: str
    type: str
    kind: str = ""  # one of LORA_KINDS, or "" for modules LoRA cannot wrap
    in_features: int = 0
    out_features: int = 0
    kernel: tuple[int, ...] = ()
    groups: int = 1
    params: dict = field(default_factory=dict)  # local name -> shape (tuple)
    norm: str = ""  # NORM_TORCH_LAYERNORM, NORM_OTHER or "" (see norm_kind)

    def to_json(self) -> list:
        return [self.name, self.type, self.kind, self.in_features, self.out_features,
                list(self.kernel), self.groups, {k: list(v) for k, v in self.params.items()}, self.norm]

    @classmethod
    def from_json(cls, row: list) -> "ModuleInfo":
        name, type_, kind, fin, fout, kernel, groups, params, norm = row
        return cls(name, type_, kind, fin, fout, tuple(kernel), groups,
                   {k: tuple(v) for k, v in params.items()}, norm)


@dataclass(frozen=True)
class ModuleTree:
    """The module tree of one model: everything mixspec needs, nothing that needs torch."""

    model_type: str
    architecture: str
    modules: tuple[ModuleInfo, ...]
    tied: dict  # alias parameter name -> canonical parameter name (shared tensor)
    input_embedding: str
    output_embedding: str
    base_model_prefix: str
    is_causal_lm_only: bool
    versions: dict

    # -- derived views -------------------------------------------------------------------
    @cached_property
    def by_name(self) -> dict[str, ModuleInfo]:
        return {m.name: m for m in self.modules}

    @cached_property
    def param_shapes(self) -> dict[str, tuple]:
        """Every parameter name, aliases of tied weights included."""
        out = {}
        for m in self.modules:
            for local, shape in m.params.items():
                out[f"{m.name}.{local}" if m.name else local] = shape
        return out

    @cached_property
    def param_numel(self) -> dict[str, int]:
        return {n: math.prod(s) for n, s in self.param_shapes.items()}

    def canonical(self, param: str) -> str:
        return self.tied.get(param, param)

    @cached_property
    def total_params(self) -> int:
        """Unique parameters (a tied pair counts once), as model.parameters() reports."""
        return sum(n for name, n in self.param_numel.items() if name not in self.tied)

    def to_json(self) -> dict:
        return {
            "format": TREE_FORMAT,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "input_embedding": self.input_embedding,
            "output_embedding": self.output_embedding,
            "base_model_prefix": self.base_model_prefix,
            "is_causal_lm_only": self.is_causal_lm_only,
            "versions": self.versions,
            "tied": dict(sorted(self.tied.items())),
            "modules": [m.to_json() for m in self.modules],
        }

    @classmethod
    def from_json(cls, data: dict) -> "ModuleTree":
        if data.get("format") != TREE_FORMAT:
            raise ValueError("tree format mismatch")
        return cls(
            model_type=data["model_type"],
            architecture=data["architecture"],
            modules=tuple(ModuleInfo.from_json(r) for r in data["modules"]),
            tied=dict(data["tied"]),
            input_embedding=data["input_embedding"],
            output_embedding=data["output_embedding"],
            base_model_prefix=data["base_model_prefix"],
            is_causal_lm_only=data["is_causal_lm_only"],
            versions=dict(data["versions"]),
        )


# -- cache ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _lib_version(name: str) -> str:
    """The installed version of a distribution, as importlib.metadata.version reports it.

    The usual layout (``site-packages/NAME-VERSION.dist-info/METADATA``) is read directly:
    importing importlib.metadata and its email parser costs a warm plan ~25 ms. Anything
    else (eggs, zips, odd names) goes through importlib.metadata."""
    found = _dist_info_version(name)
    if found is not None:
        return found
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _dist_info_version(name: str) -> str | None:
    """The Version of the first ``NAME-*.dist-info`` on sys.path (importlib.metadata's
    search order), or None when that is not how the first match is installed."""
    want = name.lower().replace("-", "_").replace(".", "_")
    for entry in sys.path:
        try:
            children = os.listdir(entry or ".")
        except NotADirectoryError:
            return None  # a zip archive on sys.path: importlib.metadata reads those
        except OSError:
            continue
        matches = [c for c in children
                   if c.lower().endswith((".dist-info", ".egg-info", ".egg"))
                   and c.split("-", 1)[0].lower().replace(".", "_") == want]
        if not matches:
            continue
        if len(matches) != 1 or not matches[0].endswith(".dist-info"):
            return None  # several copies, or an egg: let importlib.metadata decide
        try:
            with open(os.path.join(entry or ".", matches[0], "METADATA"), encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
                    if not line.strip():
                        break  # end of the headers
        except OSError:
            pass
        return None
    return None


def library_versions() -> dict:
    """Versions that change module trees; read from package metadata, without importing them."""
    return {"transformers": _lib_version("transformers"), "torch": _lib_version("torch"),
            "tree_format": str(TREE_FORMAT)}


def cache_dir() -> Path:
    env = os.environ.get("MIXSPEC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixspec"


# The code that turns a model into a tree: any change to it gives new cache keys (a format
# number alone is only as good as the memory of whoever edits this file).
_BUILDER_FILES: tuple[Path, ...] = (Path(__file__),)
_DIGESTS: dict[tuple, str] = {}


def _files_digest(paths) -> str:
    """sha256 over the names and bytes of files, memoised by (path, mtime, size)."""
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp.append((str(path), st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((str(path), None, None))
    stamp = tuple(stamp)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for path, _, _ in stamp:
            h.update(path.encode("utf-8", "surrogateescape") + b"\0")
            try:
                h.update(Path(path).read_bytes())
            except OSError:
                h.update(b"<unreadable>")
            h.update(b"\0")
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def builder_digest() -> str:
    """A hash of mixspec's tree-building source (this module)."""
    return _files_digest(_BUILDER_FILES)


def remote_code_digest(model_dir: str | Path) -> str:
    """A hash of the Python files of a model directory: what a trust_remote_code build runs
    (auto_map naming code in another repo is covered by the config, which holds auto_map)."""
    root = Path(model_dir)
    try:
        files = sorted(p for p in root.rglob("*.py") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    except OSError:
        files = []
    # names relative to the directory: the same code in another place is the same tree
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
        h.update(_files_digest((path,)).encode() + b"\0")
    return h.hexdigest()


def cache_key(config: dict, trust_remote_code: bool = False, code_digest: str = "") -> str:
    """The cache key of a tree: the config's content, the library versions and tree format,
    mixspec's tree-building source, and (remote code) the model repo's Python files."""
    payload = json.dumps({"config": config, "versions": library_versions(), "builder": builder_digest(),
                          "remote": trust_remote_code, "code": code_digest},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _cache_path(key: str) -> Path:
    return cache_dir() / "trees" / f"{key}.json"


# An entry is one JSON object, laid out so that the tree's own text can be hashed as read:
#   {"key":"<32 hex>","digest":"<sha256 of TREE>","tree":TREE}
# A file whose digest does not match (torn, truncated, edited, an older layout) is rebuilt.
_ENTRY_HEAD = '{{"key":"{key}","digest":"{digest}","tree":'

# trees this process already read or wrote, by entry path, with the entry's (mtime, size,
# inode) then: `validate` over many specs of one model reads its tree once, and an entry
# changed or removed since is read again, never trusted
_MEMO: dict[str, tuple[tuple, "ModuleTree"]] = {}


def _entry_stat(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_cached_tree(config: dict, trust_remote_code: bool = False, code_digest: str = "") -> ModuleTree | None:
    """A cached tree for this config and these library versions, or None (corrupt entries are ignored)."""
    key = cache_key(config, trust_remote_code, code_digest)
    path = _cache_path(key)
    stat = _entry_stat(path)
    if stat is None:
        return None
    memo = _MEMO.get(str(path))
    if memo is not None and memo[0] == stat:
        return memo[1]
    try:
        text = path.read_text(encoding="utf-8")
        tree_text = _verified_tree_text(text, key)
        if tree_text is None:
            return None
        data = json.loads(tree_text)
        if not isinstance(data, dict):
            return None
        tree = ModuleTree.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    _MEMO[str(path)] = (stat, tree)
    return tree


def _verified_tree_text(text: str, key: str) -> str | None:
    """The tree's JSON text of a cache entry, if the entry is whole and its digest matches."""
    prefix = '{"key":"' + key + '","digest":"'
    if not text.startswith(prefix) or not text.endswith("}"):
        return None
    digest = text[len(prefix):len(prefix) + 64]
    head = _ENTRY_HEAD.format(key=key, digest=digest)
    if not text.startswith(head):
        return None
    tree_text = text[len(head):-1]
    if hashlib.sha256(tree_text.encode("utf-8")).hexdigest() != digest:
        return None
    return tree_text


def store_tree(config: dict, tree: ModuleTree, trust_remote_code: bool = False, code_digest: str = "") -> None:
    """Write a tree to the cache atomically (concurrent writers each rename a whole file)."""
    key = cache_key(config, trust_remote_code, code_digest)
    path = _cache_path(key)
    tree_text = json.dumps(tree.to_json(), separators=(",", ":"))
    digest = hashlib.sha256(tree_text.encode("utf-8")).hexdigest()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # only when writing an entry (a warm run reads)

        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_ENTRY_HEAD.format(key=key, digest=digest) + tree_text + "}")
        os.replace(tmp, path)
        tmp = None
    except OSError:
        return  # the cache is an optimisation; an unwritable cache dir is not an error
    finally:
        if tmp is not None:  # a failed write leaves no temporary file behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
    stat = _entry_stat(path)
    if stat is not None:
        _MEMO[str(path)] = (stat, tree)


def get_tree(source: ModelSource, trust_remote_code: bool = False, use_cache: bool = True) -> ModuleTree:
    """The module tree for a model source: from the cache, or built (and then cached). A
    pre-quantized checkpoint is refused first (ModelSource.refuse_quantized), whoever asks."""
    source.refuse_quantized()
    if use_cache:
        config = copy.deepcopy(source.config)  # the key is taken from the config as read
        # a remote-code build runs the repo's own modelling files: they are part of the key
        code = remote_code_digest(source.path) if trust_remote_code and "auto_map" in config else ""
        cached = load_cached_tree(config, trust_remote_code, code)
        if cached is not None:
            return cached
    tree = build_tree(source, trust_remote_code=trust_remote_code)
    if use_cache:
        store_tree(config, tree, trust_remote_code, code)
    return tree


# -- building (imports torch and transformers) ------------------------------------------

def check_buildable(source: ModelSource, trust_remote_code: bool = False) -> None:
    """Refuse, before importing anything, configs that would need the model repo's code."""
    config = source.config
    if "auto_map" in config and not trust_remote_code:
        raise ModelSourceError(
            f"model {source.ref!r} ({source.path}/config.json) declares auto_map: building it would "
            "run Python code from the model repo, which mixspec never does by default.\n"
            "  hint: use a transformers-native checkpoint of this model (often the '-hf' variant), "
            "or, if you trust that code, set trust_remote_code: true in the spec (mixspec tree: --trust-remote-code)"
        )
    if not config.get("model_type"):
        raise ModelSourceError(f"model {source.ref!r}: config.json has no model_type")
    _check_sizes(source)


# A config's block and expert counts: building the model makes modules in proportion to them,
# and a config.json with num_hidden_layers: 10000000 would keep the meta-device build busy
# for hours. The largest published models have ~10x less than these limits.
MAX_BLOCKS = 1024
MAX_EXPERTS = 4096
MAX_BLOCKS_X_EXPERTS = 1 << 18
BLOCK_KEYS = frozenset({"num_hidden_layers", "num_layers", "n_layer", "n_layers", "depth", "encoder_layers",
                        "decoder_layers", "num_encoder_layers", "num_decoder_layers", "vision_layers"})
EXPERT_KEYS = frozenset({"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"})


def _check_sizes(source: ModelSource) -> None:
    """Refuse, before building, a config whose block or expert counts are beyond any real model."""
    blocks: list[tuple[str, int]] = []  # (dotted key, value)
    experts: list[tuple[str, int]] = []

    def walk(node, path: str, depth: int) -> None:
        if depth > 8 or not isinstance(node, dict):
            return
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                walk(value, where, depth + 1)
            elif isinstance(value, int) and not isinstance(value, bool):
                if key in BLOCK_KEYS:
                    blocks.append((where, value))
                elif key in EXPERT_KEYS:
                    experts.append((where, value))

    walk(source.config, "", 0)
    for where, value, limit in [(w, v, MAX_BLOCKS) for w, v in blocks] + [(w, v, MAX_EXPERTS) for w, v in experts]:
        if value > limit:
            raise ModelSourceError(
                f"model {source.ref!r}: config.json {where} is {value:,}, more than {limit:,}: mixspec builds "
                "the model's module tree from its config and refuses sizes beyond any published model\n"
                f"  hint: check {where} in {source.path}/config.json")
    most_blocks = max((v for _, v in blocks), default=1)
    most_experts = max((v for _, v in experts), default=1)
    if most_blocks * most_experts > MAX_BLOCKS_X_EXPERTS:
        raise ModelSourceError(
            f"model {source.ref!r}: config.json has {most_blocks:,} blocks x {most_experts:,} experts, more than "
            f"{MAX_BLOCKS_X_EXPERTS:,} expert modules: mixspec builds the model's module tree from its config "
            "and refuses sizes beyond any published model\n"
            f"  hint: check the layer and expert counts in {source.path}/config.json")


def _short(exc: BaseException, limit: int = 400) -> str:
    """transformers' messages can list every known model type (10 KB): keep the start."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + " ..."


def build_tree(source: ModelSource, trust_remote_code: bool = False) -> ModuleTree:
    """Instantiate the model class on the meta device and record its module tree."""
    check_buildable(source, trust_remote_code)
    import warnings

    try:
        import torch
        import transformers
        from transformers import CONFIG_MAPPING
    except ImportError as exc:
        raise ModelSourceError(
            f"building the module tree of {source.ref!r} needs torch and transformers ({exc}).\n"
            "  hint: pip install torch==2.13.0 (CPU) or your CUDA build, then pip install 'mixspec[model]'"
        ) from None
    transformers.logging.set_verbosity_error()
    model_type = source.model_type
    # transformers' config classes pop keys out of nested dicts (vision_config, ...): hand
    # them a deep copy, so source.config (and the cache key made from it) stays as read
    config_dict = copy.deepcopy(source.config)
    if trust_remote_code and "auto_map" in config_dict:
        config = _remote_config(source)
    else:
        if model_type not in CONFIG_MAPPING:
            raise ModelSourceError(
                f"model {source.ref!r}: transformers {transformers.__version__} does not know "
                f"model_type {model_type!r}.\n  hint: upgrade transformers, or use a checkpoint "
                "converted to a transformers-native architecture"
            )
        config_dict.pop("auto_map", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = CONFIG_MAPPING[model_type].from_dict(config_dict)
            except Exception as exc:  # a malformed config is the user's to fix
                raise ModelSourceError(f"model {source.ref!r}: config.json is not a valid {model_type} config: {_short(exc)}") from None
    # config.json may name a Hub kernel as its attention ("kernels-community/..."): building
    # would download and run it. Attention is a function, not a module: the tree is the same.
    config._attn_implementation = "eager"
    model_cls = _model_class(config, trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                if trust_remote_code and "auto_map" in config_dict:
                    model = model_cls.from_config(config, trust_remote_code=True)
                else:
                    model = model_cls._from_config(config)
        except Exception as exc:
            raise ModelSourceError(
                f"model {source.ref!r}: transformers could not build {model_cls.__name__} from its config: {_short(exc)}"
            ) from None
    try:
        return tree_from_model(model, model_type)
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ModelSourceError(
            f"model {source.ref!r}: mixspec could not record the module tree of {model_cls.__name__}: "
            f"{_short(exc)}\n  hint: this family's modules hold something mixspec does not read; "
            "report it with the model's config.json"
        ) from None


def _remote_config(source: ModelSource):
    """The config class a model repo's own code defines (auto_map, trust_remote_code): its
    files missing or broken are the user's to fix, never a traceback."""
    from transformers import AutoConfig

    auto_map = source.config.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoConfig" not in auto_map:
        raise ModelSourceError(
            f"model {source.ref!r}: config.json's auto_map names no AutoConfig, so the repo's code "
            "cannot be loaded", f"add \"AutoConfig\": \"<module>.<ConfigClass>\" to auto_map in "
            f"{source.path}/config.json, or drop auto_map to build the transformers-native class")
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=True)
    except Exception as exc:  # the repo's own code: a missing file, an import or syntax error
        raise ModelSourceError(
            f"model {source.ref!r}: the repo's code for auto_map {auto_map['AutoConfig']!r} could not be "
            f"loaded: {_short(exc)}", f"put the .py files auto_map names next to {source.path}/config.json "
            "(they come with the model repo)") from None


def _model_class(config, trust_remote_code: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    if trust_remote_code and getattr(config, "auto_map", None):
        from transformers import AutoModelForCausalLM as auto

        return auto
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel"):
        auto = getattr(transformers, auto_name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    return AutoModelForCausalLM  # raises a clear error from transformers, caught by the caller


def norm_kind(module) -> str:
    """Whether a module is a normalisation layer, decided by its type: a torch LayerNorm
    (or subclass), another torch norm (GroupNorm, RMSNorm, BatchNorm, InstanceNorm,
    LocalResponseNorm), or a class anywhere in its MRO whose name ends in ``Norm``
    (``Qwen2RMSNorm``, ``LlamaRMSNorm``, ``Gemma3RMSNorm``, ...)."""
    from torch import nn

    if isinstance(module, nn.LayerNorm):
        return NORM_TORCH_LAYERNORM
    torch_norms = tuple(c for c in (nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
                                    nn.modules.batchnorm._NormBase) if c is not None)
    if isinstance(module, torch_norms):
        return NORM_OTHER
    if any(_NORM_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__):
        return NORM_OTHER
    return ""


def tree_from_model(model, model_type: str = "") -> ModuleTree:
    """Record the module tree of an instantiated model (any device)."""
    import torch
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()

    canonical: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        if first != name:
            tied[name] = first
    modules = []
    for name, mod in model.named_modules(remove_duplicate=False):
        params = {local: tuple(p.shape) for local, p in mod.named_parameters(recurse=False)}
        kind, fin, fout, kernel, groups = "", 0, 0, (), 1
        if isinstance(mod, nn.Linear):
            kind, fin, fout = LINEAR, mod.in_features, mod.out_features
            weight = params.get("weight")
            if weight is not None and len(weight) == 2:  # the shape is the truth, whatever the
                fout, fin = weight                       # attributes hold (a tensor, once)
        elif Conv1D and isinstance(mod, Conv1D):
            kind = CONV1D_GPT2
            fin, fout = tuple(mod.weight.shape)
        elif isinstance(mod, nn.Embedding):
            kind, fin, fout = EMBEDDING, mod.num_embeddings, mod.embedding_dim
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind, fin, fout = CONV, mod.in_channels, mod.out_channels
            kernel, groups = tuple(mod.kernel_size), mod.groups
        # plain ints: modelling code may hold a size as a tensor or a numpy integer (JSON cannot)
        modules.append(ModuleInfo(name, type(mod).__name__, kind, int(fin), int(fout),
                                  tuple(int(k) for k in kernel), int(groups), params, norm_kind(mod)))

    def module_name(target) -> str:
        if target is None:
            return ""
        for n, m in model.named_modules():
            if m is target:
                return n
        return ""

    try:
        out_emb = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out_emb = None
    try:
        in_emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        in_emb = None
    arch = type(model).__name__
    return ModuleTree(
        model_type=model_type or getattr(getattr(model, "config", None), "model_type", ""),
        architecture=arch,
        modules=tuple(modules),
        tied=tied,
        input_embedding=module_name(in_emb),
        output_embedding=module_name(out_emb),
        base_model_prefix=getattr(model, "base_model_prefix", "") or "",
        is_causal_lm_only=arch.endswith("ForCausalLM"),
        versions={"transformers": _lib_version("transformers"), "torch": str(torch.__version__)},
    )
