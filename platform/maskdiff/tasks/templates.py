"""Masked templates: which positions of a sequence are given and which are to be filled.

* Protein: one character per residue, ``_`` (or ``-``, ``?``) for a residue to
  design, e.g. ``MKT____LLV`` keeps M, K, T, L, L, V and fills four residues.
* Text: literal text with ``[MASK]`` (``span`` tokens) or ``[MASK:N]`` (N
  tokens) holes, e.g. ``"To be, or [MASK:4] to be"``; a continuation is the
  prompt followed by one hole.

Both return local ids with :data:`~maskdiff.core.tokens.MISSING` at the holes.
"""

from __future__ import annotations

import re

import numpy as np

from maskdiff.errors import UserError
from maskdiff.core.tokens import MISSING

PROTEIN_HOLES = "_-?"
TEXT_HOLE = re.compile(r"\[MASK(?::(\d+))?\]")


def protein_template(template: str, alphabet: str, max_len: int | None = None) -> np.ndarray:
    """Residue ids of a template such as ``MKT____LLV`` (holes -> MISSING)."""
    t = "".join(template.split()).upper()
    if not t:
        raise UserError("empty protein template")
    bad = sorted({c for c in t if c not in alphabet and c not in PROTEIN_HOLES})
    if bad:
        raise UserError(f"template {template!r}: unknown residue letters {''.join(bad)!r}; use {alphabet} and _ for a residue to fill")
    if max_len is not None and len(t) > max_len:
        raise UserError(f"template {template!r}: {len(t)} residues, more than the {max_len} the model was trained on")
    return np.array([MISSING if c in PROTEIN_HOLES else alphabet.index(c) for c in t], dtype=np.int64)


def text_template(template: str, encode, span: int = 8, max_len: int | None = None) -> np.ndarray:
    """BPE ids of ``template`` with ``[MASK]``/``[MASK:N]`` holes as MISSING; ``encode``: str -> list of ids."""
    if span < 1:
        raise UserError(f"--span {span}: must be >= 1")
    parts: list[np.ndarray] = []
    at, holes = 0, 0
    for m in TEXT_HOLE.finditer(template):
        if m.start() > at:
            parts.append(np.asarray(encode(template[at : m.start()]), dtype=np.int64))
        n = int(m.group(1)) if m.group(1) else span
        if n < 1:
            raise UserError(f"template {template!r}: {m.group(0)} must mask at least one token")
        parts.append(np.full(n, MISSING, dtype=np.int64))
        at, holes = m.end(), holes + 1
    if at < len(template):
        parts.append(np.asarray(encode(template[at:]), dtype=np.int64))
    if holes == 0:
        raise UserError(f"template {template!r}: no [MASK] or [MASK:N] hole to fill")
    ids = np.concatenate(parts)
    if max_len is not None and ids.size > max_len:
        raise UserError(f"template {template!r}: {ids.size} tokens, more than the {max_len} the model was trained on")
    return ids


__all__ = ["PROTEIN_HOLES", "TEXT_HOLE", "protein_template", "text_template"]
