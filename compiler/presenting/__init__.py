"""Presenting: a Plan (and its estimate) in, what a person reads out: present's terminal tables,
report's HTML page, and diff, what changes in the training between two specs.
"""
