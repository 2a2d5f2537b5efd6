"""Core: errors, typed configuration, atomic file I/O, text normalisation, shared constants.

Imports nothing else from vaepipe and nothing heavier than pyyaml and the standard library.
"""
