"""mixspec: one spec for mixed-strategy fine-tuning, compiled to real training backends.

The pipeline as a library (see mixspec.api and the README): load_spec, plan_spec,
estimate_memory, render, write, compile_spec, module_tree, import_config; errors as exceptions that
carry the located problems (SpecError, UnsupportedError, ModelSourceError).
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402  (light: the heavy modules load on first use)
    compile_spec,
    estimate_memory,
    import_config,
    load_spec,
    module_tree,
    plan_spec,
    render,
    target_names,
    write,
)
from .errors import (  # noqa: E402
    Location,
    MixspecError,
    ModelSourceError,
    Problem,
    SpecError,
    Unsupported,
    UnsupportedError,
)

__all__ = [
    "__version__", "load_spec", "plan_spec", "estimate_memory", "render", "write", "compile_spec",
    "module_tree", "target_names", "import_config", "MixspecError", "SpecError", "UnsupportedError", "ModelSourceError",
    "Problem", "Location", "Unsupported",
]
