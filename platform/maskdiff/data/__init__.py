"""The data path: tables and shards on disk or a server, the held-out split, and the training loader.

It builds on :mod:`maskdiff.core` only (a test checks).
"""
