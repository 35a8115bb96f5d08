"""The spec language: a YAML file in, a validated Spec (with every value's file:line:col) out.

yamlloc reads YAML keeping locations; loader turns it into a LoadedSpec through the pydantic
models of spec (published as schemas/mixspec.schema.json) or, on the fast path, lightspec's
pydantic-free check of the same rules; settings holds every default of a run; patterns checks
user module patterns (RE2); spec_names lists the language's words for did-you-mean hints.
"""
