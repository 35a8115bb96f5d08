"""Data preflight: a spec's data files in, a report of every row (accepted, refused with file:line,
token lengths) out, computed by train.py's own row encoder (programs/hf_train.py) and cached for
plan and fit.
"""
