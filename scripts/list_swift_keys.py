"""Write compiler/importers/_swift_keys.py: every option `swift sft` / `swift rlhf` accepts, read
from ms-swift's own argument parser (HfArgumentParser over its argument dataclasses, as
swift/utils/utils.py parse_args builds it).

    .venv-swift/bin/python scripts/list_swift_keys.py 4 > /tmp/k4.json           # ms-swift 4.x installed
    PYTHONPATH=SRC3 .venv-swift/bin/python scripts/list_swift_keys.py 3 > /tmp/k3.json
        # SRC3: `git archive v3.12.6 swift | tar -x` of ms-swift's repository (its argument
        # classes import under the 4.x venv's transformers)
    python scripts/list_swift_keys.py write /tmp/k4.json /tmp/k3.json
"""

import json
import sys
from pathlib import Path


def options(cls) -> set:
    from transformers import HfArgumentParser

    parser = HfArgumentParser([cls])
    return {o[2:].replace("-", "_") for a in parser._actions for o in a.option_strings if o.startswith("--")}


def listing(version: str) -> dict:
    from contextlib import nullcontext

    if version == "4":
        from swift.arguments import RLHFArguments, SftArguments
        from swift.utils.utils import _patch_get_type_hints as patch
    else:
        from swift.llm.argument import RLHFArguments
        from swift.llm.argument import TrainArguments as SftArguments
        patch = nullcontext
    import importlib.metadata as md

    with patch():
        sft, rlhf = options(SftArguments), options(RLHFArguments)
    return {"swift": __import__("swift").__version__, "transformers": md.version("transformers"),
            "sft": sorted(sft), "rlhf": sorted(rlhf - sft)}


def block(names) -> str:
    out, line = [], "   "
    for n in names:
        if len(line) + len(n) + 1 > 100:
            out.append(line)
            line = "   "
        line += " " + n
    return "\n".join(out + [line])


def write(k4: dict, k3: dict) -> None:
    text = f'''"""Every option ms-swift's `swift sft` and `swift rlhf` accept, listed by
scripts/list_swift_keys.py from the argument parser ms-swift builds (HfArgumentParser over
its argument dataclasses: SftArguments / RLHFArguments in {k4["swift"]}, TrainArguments /
RLHFArguments in {k3["swift"]}, both with transformers {k4["transformers"]}'s TrainingArguments).
ms-swift stops on any other option (swift/pipelines/base.py: ``raise ValueError(f'remaining_argv:
...')``). Names are written with ``_``; the parser takes ``-`` too.
"""

SFT_4 = frozenset("""
{block(k4["sft"])}
""".split())

RLHF_4 = SFT_4 | frozenset("""
{block(k4["rlhf"])}
""".split())

# 3.x ran on transformers 4.x, whose TrainingArguments had options 5.x dropped (warmup_ratio,
# logging_dir, ...): 4.x's list is taken in too, less its 3.x-renamed --tuner_type
SFT_3 = (frozenset("""
{block(k3["sft"])}
""".split()) | SFT_4) - {{"tuner_type"}}

RLHF_3 = SFT_3 | RLHF_4 - {{"tuner_type"}} | frozenset("""
{block(k3["rlhf"])}
""".split())
'''
    Path(__file__).resolve().parent.parent.joinpath("compiler/importers/_swift_keys.py").write_text(text)


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(json.loads(Path(sys.argv[2]).read_text()), json.loads(Path(sys.argv[3]).read_text()))
    else:
        print(json.dumps(listing(sys.argv[1])))
