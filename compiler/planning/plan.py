"""The Plan: the IR every target renders. Immutable, JSON-serialisable, stable.

A Plan says, for every parameter of the model, which component claimed it, how it is
trained and at which learning rate, and which modules get LoRA adapters with which
settings. Targets read nothing else: not the spec, not the tree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from .. import __version__
from ..errors import Location, Problem
from ..models.names import fingerprint as names_fingerprint
from ..language.settings import DataSettings, DistributedSettings, TrainingSettings

# a setting the training view holds per trained parameter instead (their weight decays)
_IN_TRAINED = {("training", "weight_decay")}

PLAN_FORMAT = 2


@dataclass(frozen=True)
class LoraPlan:
    rank: int
    alpha: float
    dropout: float
    rslora: bool
    dora: bool
    targets: tuple[str, ...]  # full module names
    target_kinds: tuple[str, ...]  # kind of each target (linear, embedding, conv, ...)
    param_names: tuple[str, ...]  # adapter parameter names (PEFT naming, adapter "default")
    added_params: int
    targets_spec: object  # what the spec said: "all-linear", a list of leaf names, or a regex
    layers: Optional[tuple[int, ...]]
    # elements of each adapter tensor, in param_names' order (what 8-bit optimizer states depend on)
    param_sizes: tuple[int, ...] = field(default=(), compare=False)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def to_json(self) -> dict:
        return {
            "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
            "rslora": self.rslora, "dora": self.dora, "scaling": self.scaling,
            "targets_spec": self.targets_spec,
            "layers": list(self.layers) if self.layers is not None else None,
            "added_params": self.added_params,
            "target_modules": list(self.targets),
            "target_kinds": sorted(set(self.target_kinds)),
        }


@dataclass(frozen=True)
class QuantPlan:
    """A component's base Linear weights held by bitsandbytes (the spec's ``quantize``)."""

    method: str  # nf4 | fp4 | int8
    double_quant: bool  # nf4/fp4: the absmax constants quantized too
    compute_dtype: str  # nf4/fp4: bf16 | fp16 | fp32
    modules: tuple[str, ...]  # full names of the Linear modules bitsandbytes replaces
    shapes: tuple[tuple[int, int], ...]  # (out_features, in_features) of each, same order

    @property
    def params(self) -> int:
        """Weight elements held quantized (still counted as the component's frozen parameters)."""
        return sum(o * i for o, i in self.shapes)

    def to_json(self) -> dict:
        out = {"method": self.method, "modules": list(self.modules), "quantized_params": self.params}
        if self.method != "int8":
            out.update(double_quant=self.double_quant, compute_dtype=self.compute_dtype)
        return out


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    mode: str  # freeze | full | lora
    lr: Optional[float]
    weight_decay: float
    selector: str  # "role" or "modules"
    role: Optional[str]
    patterns: tuple[str, ...]
    origin: Location
    modules: tuple[str, ...]  # the smallest set of modules/parameters covering what it claimed
    params: tuple[str, ...]  # base parameter names it claimed (canonical names only)
    base_params: int
    trainable_params: int
    lora: Optional[LoraPlan] = None
    # trained parameters exempt from weight decay (mixspec.planning.decay's rule), and their count
    no_decay: tuple[str, ...] = ()
    no_decay_params: int = 0
    quantize: Optional[QuantPlan] = None

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """Names of the parameters this component trains (base names, then adapter names)."""
        if self.mode == "full":
            return self.params
        if self.mode == "lora" and self.lora:
            return self.lora.param_names
        return ()

    @property
    def decay_names(self) -> tuple[str, ...]:
        """Trained parameters that get this component's weight decay."""
        exempt = set(self.no_decay)
        return tuple(n for n in self.trainable_names if n not in exempt)

    def weight_decays(self) -> dict[str, float]:
        """Each trained parameter -> the weight decay its optimizer group must have."""
        exempt = set(self.no_decay)
        return {n: 0.0 if n in exempt else self.weight_decay for n in self.trainable_names}

    def to_json(self) -> dict:
        return {
            "name": self.name, "mode": self.mode, "lr": self.lr,
            "weight_decay": self.weight_decay,
            "selector": {"role": self.role} if self.role else {"modules": list(self.patterns)},
            "origin": self.origin.to_json(),
            "base_params": self.base_params, "trainable_params": self.trainable_params,
            "modules": list(self.modules),
            "lora": self.lora.to_json() if self.lora else None,
            "decay": {"tensors": len(self.trainable_names) - len(self.no_decay),
                      "params": self.trainable_params - self.no_decay_params},
            "no_decay": {"tensors": len(self.no_decay), "params": self.no_decay_params,
                         "names": list(self.no_decay)},
            "param_names": list(self.params),
            **({"quantize": self.quantize.to_json()} if self.quantize else {}),
        }


@dataclass(frozen=True)
class Totals:
    base_params: int
    added_params: int
    trainable_params: int

    @property
    def all_params(self) -> int:
        return self.base_params + self.added_params


@dataclass(frozen=True)
class Plan:
    spec_path: str
    model: str
    model_source: str  # catalog | local | hf-cache | modelscope-cache
    model_path: str
    model_type: str
    architecture: str
    versions: dict
    roles: dict  # role -> prefixes
    components: tuple[ComponentPlan, ...]
    unassigned_params: tuple[str, ...]
    unassigned_base_params: int
    unassigned_modules: tuple[str, ...]
    tied: dict
    totals: Totals
    training: TrainingSettings
    distributed: DistributedSettings
    data: Optional[DataSettings]
    output_dir: Optional[str]
    param_shapes: dict = field(repr=False, default_factory=dict)  # trainable base params only
    # torch.nn.LayerNorm modules of the model: what transformers' own no-decay rule looks for
    # (a backend fact, for targets that must tell whether a backend's rule gives the Plan's sets)
    layernorm_modules: tuple[str, ...] = field(repr=False, default=())
    warnings_problems: tuple[Problem, ...] = ()
    trust_remote_code: bool = False  # the spec allows the model repo's own code (targets that load it)
    # block kinds, vocab, vision patching: what the activation estimate reads (mixspec.planning.activations)
    structure: dict = field(repr=False, default_factory=dict, compare=False)
    # FSDP2 wrap units: the blocks of every tower, by class (mixspec.planning.units.wrap_units)
    units: tuple = field(repr=False, default=(), compare=False)
    # bitsandbytes: every Linear the Plan does not quantize, as the fewest module names (full
    # names: what a BitsAndBytesConfig's llm_int8_skip_modules must hold); () when nothing is
    quant_skip_modules: tuple[str, ...] = ()
    # the Plan quantizes exactly what transformers does with no skip list (what ms-swift and
    # LLaMA-Factory load with): their quantization flags are then exact
    quant_is_default: bool = False

    @property
    def multimodal(self) -> bool:
        """Rows are read with the model's processor (a vision or audio tower), not its tokenizer alone."""
        return any(r in self.roles for r in ("vision", "audio"))

    @property
    def quantized(self) -> bool:
        """Some component holds its base weights quantized (bitsandbytes)."""
        return any(c.quantize for c in self.components)

    def quant_config(self) -> Optional[QuantPlan]:
        """The one bitsandbytes setting of the run (resolve makes every quantized component agree)."""
        return next((c.quantize for c in self.components if c.quantize), None)

    def component(self, name: str) -> ComponentPlan:
        return next(c for c in self.components if c.name == name)

    def trainable_lrs(self) -> dict[str, float]:
        """Every trainable parameter name (as named in the model, PEFT prefix excluded) -> LR."""
        out: dict[str, float] = {}
        for comp in self.components:
            for name in comp.trainable_names:
                out[name] = comp.lr  # type: ignore[assignment]
        return dict(sorted(out.items()))

    def trainable_weight_decays(self) -> dict[str, float]:
        """Every trainable parameter name -> its weight decay (0.0 for the no-decay ones)."""
        out: dict[str, float] = {}
        for comp in self.components:
            out.update(comp.weight_decays())
        return dict(sorted(out.items()))

    def optimizer_fingerprint(self) -> str:
        """A short hash of the sorted trainable names, their learning rates and weight decays
        (``NAME=LR wd=WD`` lines): what train.py and the swift plugin recompute from the
        optimizer they built. It stays the same when only LoRA or run settings change."""
        return names_fingerprint(self.trainable_lrs(), self.trainable_weight_decays())

    def training_view(self) -> dict:
        """What the training does, independent of how the spec names and groups it: the model,
        every trained parameter with its LR and weight decay, every LoRA module's settings, and
        the training/distributed/data settings (``mixspec diff`` compares these)."""
        wds = self.trainable_weight_decays()
        lora = {}
        for comp in self.components:
            if comp.lora:
                lo = comp.lora
                for target in lo.targets:
                    lora[target] = (lo.rank, lo.alpha, lo.dropout, lo.rslora, lo.dora)
        settings = {}
        for section in ("training", "distributed", "data"):
            value = getattr(self, section)
            values = value.to_json() if hasattr(value, "to_json") else dict(value or {})
            for key, item in sorted(values.items()):
                if (section, key) not in _IN_TRAINED:
                    settings[f"{section}.{key}"] = item
        settings["output_dir"] = self.output_dir
        return {
            "model": (self.model, self.architecture, self.totals.base_params),
            "trained": {n: (lr, wds[n]) for n, lr in self.trainable_lrs().items()},
            "lora": dict(sorted(lora.items())),
            "settings": settings,
        }

    def fingerprint(self) -> str:
        """The plan fingerprint: a short hash of the training view, so it changes whenever
        the training does (a LoRA rank, a dropout, a batch size, not only names and LRs)."""
        text = json.dumps(self.training_view(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "mixspec_version": __version__,
            "spec": self.spec_path,
            "model": {"ref": self.model, "source": self.model_source, "model_type": self.model_type,
                      "architecture": self.architecture, "versions": self.versions},
            "roles": {k: list(v) for k, v in sorted(self.roles.items())},
            "totals": {"base_params": self.totals.base_params,
                       "added_params": self.totals.added_params,
                       "trainable_params": self.totals.trainable_params,
                       "all_params": self.totals.all_params},
            "components": [c.to_json() for c in self.components],
            "unassigned": {"base_params": self.unassigned_base_params,
                           "modules": list(self.unassigned_modules)},
            "tied": dict(sorted(self.tied.items())),
            "fingerprint": self.fingerprint(),
            "optimizer_fingerprint": self.optimizer_fingerprint(),
            "training": self.training.to_json(),
            "distributed": self.distributed.to_json(),
            "data": self.data.to_json() if self.data else None,
            "output_dir": self.output_dir,
            "warnings": [p.to_json() for p in self.warnings_problems],
            **({"quantization_skip_modules": list(self.quant_skip_modules)} if self.quantized else {}),
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
