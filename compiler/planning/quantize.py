"""Quantized bases and 8-bit optimizers: which modules bitsandbytes replaces, and their bytes.

Which modules. transformers (integrations/bitsandbytes.py, ``replace_with_bnb_linear``)
replaces every module whose class is exactly ``torch.nn.Linear`` (not a subclass) or GPT-2's
``Conv1D``, unless ``llm_int8_skip_modules`` names it. A component with ``quantize`` holds
those of its modules that it claims whole, except the output embedding (transformers keeps
it in 16 bit by default) and modules with a tied weight (one tensor shared with a module
that is not quantized). Everything else that transformers would replace goes into the skip
list, as full module names: a short name ("vision_tower") only matches as a suffix or from
the start of the name, so it does not skip ``model.vision_tower``'s children.

Bytes (bitsandbytes 0.50, measured on CPU by tests/planning/test_quantize.py):

- nf4/fp4: two 4-bit values a byte; one fp32 absmax a block of 64 elements; a 16-entry fp32
  code. Double quantization holds the absmax in 8 bit instead, with a second level of one
  fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset.
- int8 (LLM.int8): one byte an element and one fp32 scale a row (``SCB``).
- AdamW 8-bit (bnb ``Optimizer2State``): a tensor of at least 4096 elements keeps its two
  moments in 8 bit, blockwise: one byte each and an fp32 absmax each per block of 256; a
  smaller tensor keeps fp32 moments. Two shared 256-entry fp32 maps per optimizer.
  Paged variants hold the same bytes in CUDA unified memory, which can spill to CPU.
"""

from __future__ import annotations

import math
import re

from ..models.tree import CONV1D_GPT2, LINEAR, ModuleTree

QUANT_BLOCK = 64  # bnb 4-bit blocksize (Params4bit default)
NESTED_BLOCK = 256  # double quantization: absmax blocks per second-level block
CODE_4BIT = 16  # fp32 entries of the nf4/fp4 code
CODE_NESTED = 256  # fp32 entries of the 8-bit code of the nested absmax

OPTIMIZERS_8BIT = ("adamw_8bit", "paged_adamw_8bit")
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw")
MIN_8BIT_SIZE = 4096  # bnb optimizers' min_8bit_size: smaller tensors keep 32-bit states
OPTIM_BLOCK = 256  # bnb blockwise optimizer states: elements per absmax
OPTIM_QMAP_BYTES = 2 * 256 * 4  # qmap1 and qmap2, shared by every tensor of one optimizer
# torchao's low-bit AdamW (torchao/optim/adam.py, subclass_8bit.py / subclass_4bit.py): a tensor
# of at least 4096 elements, a whole number of blocks, keeps each moment as codes + one fp32
# scale per block + its own fp32 lookup table; any other tensor keeps fp32 moments.
# optimizer -> (block size, bits per code, lookup-table entries)
TORCHAO_OPTIMIZERS = {"adamw_torch_8bit": (256, 8, 256), "adamw_torch_4bit": (128, 4, 16)}


def replaced_by_bnb(module) -> bool:
    """transformers replaces exactly nn.Linear (type name Linear, not a subclass) and Conv1D."""
    return (module.kind == LINEAR and module.type == "Linear") or module.kind == CONV1D_GPT2


def quantizable_modules(tree: ModuleTree, claimed: set[str]) -> list:
    """The modules a quantized component holds quantized: replaced by bnb, claimed whole,
    not the output embedding, no tied weight."""
    tied = set(tree.tied) | set(tree.tied.values())
    out = []
    for m in tree.modules:
        if not m.name or not replaced_by_bnb(m) or "weight" not in m.params:
            continue
        names = [f"{m.name}.{local}" for local in m.params]
        if m.name == tree.output_embedding or any(n in tied for n in names):
            continue
        if all(n in claimed for n in names):
            out.append(m)
    return out


def skip_modules(tree: ModuleTree, quantized: set[str]) -> tuple[str, ...]:
    """The fewest module names covering every module bnb would replace but the Plan does not
    quantize, none of them holding a quantized module (llm_int8_skip_modules, full names)."""
    holds_quantized: set[str] = set()
    for name in quantized:
        parts = name.split(".")
        holds_quantized.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    module_names = {m.name for m in tree.modules}
    out: set[str] = set()
    for m in tree.modules:
        if not m.name or m.name in quantized or not replaced_by_bnb(m):
            continue
        parts = m.name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in module_names and prefix not in holds_quantized:
                out.add(prefix)
                break
    from ..models.names import shallowest

    return shallowest(out)


def quantized_weight_bytes(method: str, double_quant: bool, out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes holds for one quantized Linear weight (its bias is not included)."""
    n = out_features * in_features
    if method == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / QUANT_BLOCK)
    packed = math.ceil(n / 2) + 4 * CODE_4BIT
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * CODE_NESTED + 4


def optimizer_state_bytes(optimizer: str, numel: int) -> int:
    """Bytes of AdamW's two moments for one trained tensor of ``numel`` elements."""
    if optimizer in OPTIMIZERS_8BIT and numel >= MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * math.ceil(numel / OPTIM_BLOCK)
    if optimizer in TORCHAO_OPTIMIZERS:
        block, bits, table = TORCHAO_OPTIMIZERS[optimizer]
        if numel >= MIN_8BIT_SIZE and numel % block == 0:
            return 2 * (numel * bits // 8 + 4 * (numel // block) + 4 * table)
    return 8 * numel


def optimizer_fixed_bytes(optimizer: str, sizes) -> int:
    """Bytes one optimizer holds once, whatever its tensors: the 8-bit quantization maps."""
    if optimizer in OPTIMIZERS_8BIT and any(n >= MIN_8BIT_SIZE for n in sizes):
        return OPTIM_QMAP_BYTES
    return 0


def default_skip(tree: ModuleTree) -> tuple[str, ...]:
    """What transformers skips when a BitsAndBytesConfig has no llm_int8_skip_modules
    (quantizers/base.py get_keys_to_not_convert): tied weights' modules, the module of the
    last parameter, the output embedding. ms-swift, LLaMA-Factory and axolotl pass no skip list."""
    params = [n for n in tree.param_shapes if n not in tree.tied]
    last = params[-1].rsplit(".", 1)[0] if params else ""
    tied = {n.rsplit(".", 1)[0] for pair in tree.tied.items() for n in pair}
    return tuple(sorted(({tree.output_embedding, last} | tied) - {""}))


def bnb_replaced(tree: ModuleTree, skip: tuple[str, ...] | None = None) -> set[str]:
    """The modules transformers replaces by bitsandbytes ones for a skip list (None: its default
    list), by its own matching rule (quantizers_utils.should_convert_module: each entry a regex
    from the start of the name up to a dot boundary, or a plain suffix)."""
    keys = default_skip(tree) if skip is None else skip
    out = set()
    for m in tree.modules:
        if not m.name or not replaced_by_bnb(m):
            continue
        if any(re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", m.name) or m.name.endswith(key) for key in keys):
            continue
        out.add(m.name)
    return out
