"""Models: a model id or directory in, its module tree and the roles of its parts out, with no weights.

sources finds config.json (a local directory, the HF cache, or the built-in catalog/); tree builds
the module tree on the meta device (cached); registry assigns the roles (vision, aligner,
language, ...); names holds the helpers over dotted names that the generated programs also
inline; tiny writes a random tiny model of a family for CPU smoke runs.
"""
