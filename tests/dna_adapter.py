"""A fifth modality, for the tests only: DNA sequences (A, C, G, T), one per line of a text file.

Importing this module registers it; nothing in the core names it. The tests
shard, train, evaluate and sample it next to the built-in modalities.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from maskdiff.adapters import Adapter, RawItem, Reject, register_adapter
from maskdiff.adapters.base import expand_inputs, open_text, options_from
from maskdiff.core.tokens import Field, Record, Support

BASES = "ACGT"
BASE = "dna/base"


class DNAAdapter(Adapter):
    modality = "dna"
    name = "dna-lines"
    default_schedule = "cosine"
    keeps_lengths = True

    def __init__(self, max_len: int = 64) -> None:
        super().__init__(**options_from(locals()))
        self.max_len = max_len

    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        for path, _root in expand_inputs(paths, (".txt",)):
            with open_text(path) as lines:
                for i, line in enumerate(lines, 1):
                    yield f"{path}#{i}", line.strip()

    def encode(self, raw: str) -> Record:
        seq = raw.upper()
        if not seq:
            raise Reject("empty sequence")
        bad = sorted(set(seq) - set(BASES))
        if bad:
            raise Reject(f"not DNA bases: {''.join(bad)!r}")
        if len(seq) > self.max_len:
            raise Reject(f"length {len(seq)} exceeds max_len {self.max_len}")
        return Record([Field("sequence", BASE, np.array([BASES.index(c) for c in seq]))], {"sequence": seq})

    def decode(self, record: Record) -> str:
        return "".join(BASES[i] for i in record["sequence"].tokens.tolist())

    def supports(self) -> list[Support]:
        return [Support(BASE, "dna", len(BASES))]


register_adapter(DNAAdapter)


def write_dna(path: Path, records: int = 300, seed: int = 0) -> Path:
    """``records`` lines of repeats of short motifs (learnable) of 8 to 24 bases, plus one line to reject."""
    rng = random.Random(seed)
    motifs = ["ACGT", "GATTACA", "TTAGG", "CCG"]
    lines = []
    for _ in range(records):
        motif = rng.choice(motifs)
        length = rng.randint(8, 24)
        lines.append((motif * length)[:length])
    path.write_text("\n".join(lines + ["ACGN"]) + "\n")
    return path
