"""fit(plan, gpu_memory_gb) -> FitResult: the settings that fit one GPU's memory with the least
slowdown, keeping the global batch (nodes x GPUs x micro-batch x accumulation).

Searched: DeepSpeed ZeRO stage (none, 1, 2, 3), CPU offload (none, optimizer, all with ZeRO-3),
and, where the target runs it (``fsdp=True``: the hf and swift targets), FSDP2 shard_grad_op and
full_shard with offload none or all; gradient checkpointing (off, on), micro-batch (every
divisor of the samples per GPU per step, accumulation making up the rest). Preference, from
the least slowdown: no offload (it moves the optimizer step, or every parameter, over PCIe),
then no gradient checkpointing (it redoes each forward, about a third more compute), then not
ZeRO-3 or full_shard (they gather every parameter twice a step), then the larger micro-batch,
then the lower ZeRO stage (shard_grad_op counts as 2, full_shard as 3), DeepSpeed before FSDP2
at equal cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import GIB, Estimate, estimate
from .plan import Plan

_OFFLOAD_RANK = {"none": 0, "optimizer": 1, "all": 2}


@dataclass(frozen=True)
class Option:
    zero_stage: int | None
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int
    gradient_accumulation: int
    estimate: Estimate
    fits: bool
    fsdp: str | None = None  # FSDP2 strategy (zero_stage is then None)

    @property
    def preference(self) -> tuple:
        stage = {"shard_grad_op": 2, "full_shard": 3}.get(self.fsdp, self.zero_stage)
        return (_OFFLOAD_RANK[self.offload], self.gradient_checkpointing, stage == 3,
                -self.micro_batch_size, -1 if stage is None else stage, self.fsdp is not None)

    def describe(self) -> str:
        stage = "no DeepSpeed" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        if self.fsdp:
            stage = f"FSDP2 {self.fsdp}"
        return (f"{stage}, offload {self.offload}, checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                f"micro-batch {self.micro_batch_size} x accumulation {self.gradient_accumulation}")

    def spec_lines(self) -> list[str]:
        """The spec lines that select this option."""
        training = (f"training: {{micro_batch_size: {self.micro_batch_size}, gradient_accumulation: "
                    f"{self.gradient_accumulation}, gradient_checkpointing: {str(self.gradient_checkpointing).lower()}}}")
        if self.fsdp:
            distributed = f"distributed: {{fsdp: {self.fsdp}, offload: {self.offload}}}   # and no zero_stage"
        elif self.zero_stage is None:
            distributed = "distributed: {zero_stage: null, offload: none}   # remove zero_stage: plain DDP"
        else:
            distributed = f"distributed: {{zero_stage: {self.zero_stage}, offload: {self.offload}}}"
        return [training, distributed]


@dataclass(frozen=True)
class FitResult:
    gpu_memory_gb: float
    current: Option
    options: tuple[Option, ...]  # by preference

    @property
    def best(self) -> Option | None:
        return next((o for o in self.options if o.fits), None)

    @property
    def smallest(self) -> Option:
        return min(self.options, key=lambda o: o.estimate.peak_bytes)


def _layouts(fsdp: bool, bnb: bool):
    """(zero_stage, fsdp strategy, offload) of every sharding layout searched; a quantized base
    or a bitsandbytes optimizer is planned (and compiled) without DeepSpeed or FSDP2 only."""
    for stage in (None,) if bnb else (None, 1, 2, 3):
        offloads = ("none",) if stage is None else ("none", "optimizer") + (("all",) if stage == 3 else ())
        for offload in offloads:
            yield stage, None, offload
    if fsdp and not bnb:
        for strategy in ("shard_grad_op", "full_shard"):
            for offload in ("none", "all"):
                yield None, strategy, offload


FSDP_TARGETS = (None, "hf", "swift")  # the targets that compile distributed.fsdp (None: hf)


def fit(plan: Plan, gpu_memory_gb: float, target: str | None = None, fsdp: bool = True) -> FitResult:
    """Every option's estimate as ``target`` runs it (mixspec.planning.policy; default hf), by
    preference; the best is the first that fits. ``fsdp``: search FSDP2 too (where the target
    runs it: FSDP_TARGETS)."""
    training, dist = plan.training, plan.distributed
    micro, accum = training.micro_batch_size, training.gradient_accumulation
    per_gpu = micro * accum
    limit = gpu_memory_gb * 1e9
    options = []
    bnb = plan.quantized or training.optimizer != "adamw"
    for stage, strategy, offload in _layouts(fsdp and target in FSDP_TARGETS, bnb):
        for checkpointing in (False, True):
            for mb in (d for d in range(per_gpu, 0, -1) if per_gpu % d == 0):
                est = estimate(plan, {"zero_stage": stage, "fsdp": strategy, "offload": offload,
                                      "gradient_checkpointing": checkpointing, "micro_batch_size": mb}, target)
                options.append(Option(stage, offload, checkpointing, mb, per_gpu // mb, est,
                                      est.peak_bytes <= limit, strategy))
    options.sort(key=lambda o: o.preference)
    current_est = estimate(plan, target=target)
    current = Option(dist.zero_stage, dist.offload,
                     bool(training.gradient_checkpointing), micro, accum, current_est,
                     current_est.peak_bytes <= limit, dist.fsdp)
    return FitResult(gpu_memory_gb, current, tuple(options))


def render_fit(result: FitResult, show: int = 12) -> list[str]:
    """The advice as lines of text."""
    gb = result.gpu_memory_gb
    cur = result.current
    lines = [f"GPU memory {gb:.4g} GB = {gb * 1e9 / GIB:.2f} GiB; now: {cur.describe()}: peak "
             f"{cur.estimate.peak_bytes / GIB:.2f} GiB ({'fits' if cur.fits else 'does not fit'})"]
    if cur.estimate.policy is not None:  # each option's own policy: DeepSpeed or not changes the dtypes
        lines.append(f"memory {cur.estimate.policy.describe()}")
    best = result.best
    if best is None:
        small = result.smallest
        over = small.estimate.peak_bytes - gb * 1e9
        lines.append(f"does not fit: the smallest peak is {small.estimate.peak_bytes / GIB:.2f} GiB ({small.describe()}), "
                     f"{over / GIB:.2f} GiB over; use more GPUs, a shorter max_length, fewer images or LoRA instead of full")
    else:
        lines.append(f"fits with the least slowdown: {best.describe()}: peak {best.estimate.peak_bytes / GIB:.2f} GiB")
        if best != cur:
            lines.append("spec lines to change:")
            lines += [f"  {line}" for line in best.spec_lines()]
    fitting = [o for o in result.options if o.fits]
    if show >= len(result.options):
        listed, what = list(result.options), "all, by preference (peak per GPU):"
    elif fitting:
        listed, what = fitting[:show], "those that fit, by preference (peak per GPU; --all lists every option):"
    else:  # nothing fits: the nearest misses say how far off the run is
        listed = sorted(result.options, key=lambda o: o.estimate.peak_bytes)[:show]
        what = "the smallest peaks (per GPU; --all lists every option):"
    lines.append(f"{len(fitting)} of {len(result.options)} options fit; {what}")
    for option in listed:
        mark = "fits" if option.fits else "--"
        lines.append(f"  {mark:<4} {option.estimate.peak_bytes / GIB:>8.2f} GiB  {option.describe()}")
    hidden = (len(fitting) if fitting else len(result.options)) - len(listed)
    if hidden > 0:
        lines.append(f"  ... and {hidden} more{' that fit' if fitting else ''} (--all lists every option)")
    return lines


def parse_gpu_memory(text: str) -> float:
    """``--gpu-memory``: a number of GB (10^9 bytes), or with its unit: ``80GB``, ``80GiB``.
    Returns GB; raises ValueError with what to write."""
    import re

    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(gb|gib|g)?\s*", text, re.IGNORECASE)
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"--gpu-memory {text!r}: give the memory of one GPU, e.g. 80GiB, 80GB or 80 (GB)")
    value = float(found.group(1))
    return value * GIB / 1e9 if (found.group(2) or "").lower() == "gib" else value


def write_fitted_spec(spec_path, option: Option, out_path) -> str:
    """A copy of the spec with the option's settings, checked by the spec loader before it is
    written (comments are not kept; relative paths stay as written, so put it next to the
    original). Returns what was written."""
    import copy
    from pathlib import Path

    import yaml

    from ..language.loader import load_spec_text
    from ..output import write_files
    from ..language.yamlloc import load_located

    data = copy.deepcopy(load_located(spec_path).data)  # YAML 1.2 scalars, as mixspec reads them
    training = data.get("training") or {}
    data["training"] = training
    training.update(micro_batch_size=option.micro_batch_size, gradient_accumulation=option.gradient_accumulation,
                    gradient_checkpointing=option.gradient_checkpointing)
    dist = data.get("distributed") or {}
    data["distributed"] = dist
    if option.fsdp:
        dist.pop("zero_stage", None)
        dist.update(fsdp=option.fsdp, offload=option.offload)
    elif option.zero_stage is None:
        dist.pop("zero_stage", None)
        dist.pop("fsdp", None)
        dist["offload"] = "none"
    else:
        dist.pop("fsdp", None)
        dist.update(zero_stage=option.zero_stage, offload=option.offload)
    text = (f"# written by mixspec fit from {spec_path}: {option.describe()}\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    out = Path(out_path)
    load_spec_text(text, str(out))  # raises SpecError if the copy would not load
    write_files(out.parent, {out.name: text}, force=True)
    return text
