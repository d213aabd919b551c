"""Protein: FASTA / FASTA.gz sequences through Bio.SeqIO, one token per residue.

The alphabet is the 20 standard residues plus X, B, Z, U, O (support
``protein/residue``, 25 values); letters are read case-insensitively and
decode in upper case. A terminal ``*`` (translation stop, as gene callers
write it) is stripped and noted in ``meta["stop"]`` (``stop=reject`` refuses
such records instead); any other letter, or a ``*`` inside the sequence,
rejects the record naming the letters and the first position.

Length policy: sequences longer than ``max_len`` are cropped to their first
``max_len`` residues with ``meta["crop"] = {"start", "end", "length"}``
(``length_policy=crop``) or rejected (``length_policy=reject``).

Headers are kept in ``meta``: ``id``, ``description`` and the parsed
``header`` — for UniProt headers ``db``, ``accession``, ``entry`` and the
``KEY=value`` pairs (``OS``, ``OX``, ``GN``, ``PE``, ...); ``KEY=value`` pairs
of other headers (``;``- or space-separated, as gene callers write them) too.
Header keys named in ``condition`` become conditioning fields of shape ``(1,)``
with their own support ``protein/<dataset>/<KEY>`` (``<dataset>``: the name of
the shard set it was fitted for, see :mod:`maskdiff.core.tokens`; ``protein/<KEY>``
without one), so FASTA sources with different header fields or values train
together while all share the residues, fitted categories (at most
``max_categories``, the most frequent; other values share an *other*
bucket, or reject the record with ``unseen=reject``) and MISSING where a header lacks the key. ``condition=auto``
picks those of OS, OX, PE present in any record.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from Bio import SeqIO

from maskdiff.core.tokens import Field, Record, Support

from .base import Adapter, CategoryVocab, InputError, Option, RawItem, Reject, Rejected, expand_inputs, open_text, options_from

ALPHABET = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"
RESIDUE = "protein/residue"
AUTO_KEYS = ("OS", "OX", "PE")
_LUT = np.full(256, -1, dtype=np.int64)
_LUT[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET))
_KEY_VALUE = re.compile(r"(?:^|[\s;])([A-Za-z_][\w]*)=(.*?)(?=[\s;]+[A-Za-z_][\w]*=|\s*$)")


def parse_header(record_id: str, description: str) -> dict[str, str]:
    """Fields of a FASTA header: UniProt ``db|ACC|ENTRY`` ids plus ``KEY=value`` pairs."""
    out: dict[str, str] = {}
    parts = record_id.split("|")
    if len(parts) == 3 and parts[0] in ("sp", "tr"):
        out.update(db=parts[0], accession=parts[1], entry=parts[2])
    rest = description[len(record_id):] if description.startswith(record_id) else description
    for key, value in _KEY_VALUE.findall(rest):
        out.setdefault(key, value.strip())
    return out


class ProteinAdapter(Adapter):
    modality = "protein"
    default_schedule = "linear"
    keeps_lengths = True  # generation draws a sequence length from the training lengths
    name = "protein-fasta"
    namespaced = True
    options_spec = (
        Option("length_policy", "sequences longer than --max-len: crop to the first --max-len residues (recorded in meta) or reject (default crop)", str, ("crop", "reject")),
        Option("stop", "a terminal '*' stop symbol: strip it (recorded in meta) or reject the record (default strip)", str, ("strip", "reject")),
        Option("condition", "header keys to keep as conditioning fields, comma-separated (e.g. OS,PE), 'none', or 'auto' = those of OS,OX,PE present in the data (default auto)", str, metavar="KEYS"),
        Option("max_categories", "keep at most N values per conditioning field, the rest share an 'other' bucket (default 1000)", int, metavar="N"),
        Option("unseen", "a value that is not a kept category (unseen when fitting, or beyond the cap): map it to the 'other' bucket or reject the record (default other)", str, ("other", "reject")),
    )

    def __init__(self, max_len: int = 1024, length_policy: str = "crop", stop: str = "strip", condition: str = "auto", max_categories: int = 1000, unseen: str = "other",
                 dataset: str | None = None) -> None:
        super().__init__(**options_from(locals()))
        if max_len < 1:
            raise InputError(f"--max-len {max_len}: must be at least 1")
        self.max_len = max_len
        no_conditions = (condition or "none").strip() == "none"
        self.vocabs: dict[str, CategoryVocab] | None = {} if no_conditions else None  # stateless without conditions

    # --- reading ------------------------------------------------------------------
    def read(self, paths: Sequence[str | Path]) -> Iterator[RawItem]:
        for path, _root in expand_inputs(paths, (".fasta", ".fa", ".faa", ".fas", ".fasta.gz", ".fa.gz", ".faa.gz")):
            n = 0
            try:
                with open_text(path) as handle:
                    for n, rec in enumerate(SeqIO.parse(handle, "fasta"), 1):
                        if not rec.id:
                            yield Rejected(f"{path}#{n}", "header line without an identifier")
                            continue
                        yield f"{path}#{n}:{rec.id}", {"id": rec.id, "description": rec.description, "sequence": str(rec.seq)}
            except UnicodeDecodeError:
                raise InputError(f"{path}: not a FASTA text file (undecodable bytes)") from None
            except ValueError as e:
                if "comments at the beginning" not in str(e):
                    raise InputError(f"{path}: not valid FASTA ({str(e).splitlines()[0]})") from None
                with open_text(path) as f:
                    blank = not f.read(1 << 16).strip()
                raise InputError(f"{path}: " + ("holds no FASTA record" if blank else "not valid FASTA (text before the first '>' header line)")) from None
            except (EOFError, OSError) as e:
                raise InputError(f"{path}: cannot be read to the end ({e})") from None
            if n == 0:
                raise InputError(f"{path}: holds no FASTA record")

    # --- fitting --------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        return self.vocabs is None

    def fit(self, raws: Iterable[dict[str, Any]]) -> None:
        headers = []
        for raw in raws:
            try:
                self._residues(raw["sequence"])
            except Reject:
                continue
            headers.append(parse_header(raw["id"], raw["description"]))
        keys = self._condition_keys(headers)
        self.vocabs = {k: CategoryVocab.fit((h.get(k) for h in headers), self.options["max_categories"], self.options["unseen"]) for k in keys}

    def _condition_keys(self, headers: list[dict[str, str]]) -> list[str]:
        spec = (self.options["condition"] or "none").strip()
        if spec == "none":
            return []
        if spec == "auto":
            counts = Counter(k for h in headers for k in h)
            return [k for k in AUTO_KEYS if counts[k]]
        keys = [k.strip() for k in spec.split(",") if k.strip()]
        if "sequence" in keys:
            raise InputError("--condition: 'sequence' is the residue field, not a header key")
        return keys

    # --- encoding -------------------------------------------------------------------
    def _residues(self, sequence: str) -> tuple[str, dict[str, Any]]:
        """The validated upper-case sequence and its meta (stop, crop); raise Reject."""
        seq, meta = sequence.upper(), {}
        if seq.endswith("*"):
            if self.options["stop"] == "reject":
                raise Reject("terminal stop symbol '*' (stop=reject)")
            seq, meta["stop"] = seq[:-1], True
        if not seq:
            raise Reject("empty sequence (truncated entry?)")
        bad = sorted(set(seq) - set(ALPHABET))
        if bad:
            first = next(i for i, c in enumerate(seq) if c in bad)
            what = "stop symbol '*' inside the sequence" if bad == ["*"] else f"unknown residue letters {''.join(bad)!r}"
            raise Reject(f"{what} (first at position {first + 1})")
        if len(seq) > self.max_len:
            if self.options["length_policy"] == "reject":
                raise Reject(f"length {len(seq)} exceeds --max-len {self.max_len}")
            meta["crop"] = {"start": 0, "end": self.max_len, "length": len(seq)}
            seq = seq[: self.max_len]
        return seq, meta

    def encode(self, raw: dict[str, Any]) -> Record:
        if self.vocabs is None:
            raise RuntimeError("protein adapter is not fitted")
        seq, meta = self._residues(raw["sequence"])
        header = parse_header(raw["id"], raw["description"])
        tokens = _LUT[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
        fields = [Field("sequence", RESIDUE, tokens)]
        for key, vocab in self.vocabs.items():
            fields.append(Field(key, self.support_name(key), np.array([vocab.encode(header.get(key), key)])))
        meta.update(id=raw["id"], description=raw["description"], header=header)
        return Record(fields, meta)

    def decode(self, record: Record) -> dict[str, Any]:
        seq = "".join(ALPHABET[i] for i in record["sequence"].tokens.tolist())
        if record.meta.get("stop"):
            seq += "*"
        names = {f.name for f in record.fields}
        conditions = {k: v.decode(int(record[k].tokens[0])) for k, v in (self.vocabs or {}).items() if k in names}
        return {"id": record.meta.get("id"), "description": record.meta.get("description"), "sequence": seq, "conditions": conditions}

    def supports(self) -> list[Support]:
        if self.vocabs is None:
            raise RuntimeError("protein adapter is not fitted")
        return [Support(RESIDUE, "protein", len(ALPHABET))] + [Support(self.support_name(k), "protein", v.size) for k, v in self.vocabs.items()]

    # --- persistence ----------------------------------------------------------------
    def _fitted_state(self, root_dir: str | Path | None) -> dict[str, Any]:
        return {"conditions": {k: v.to_dict() for k, v in (self.vocabs or {}).items()}} if self.vocabs is not None else {}

    def _load_fitted(self, fitted: dict[str, Any], root_dir: Path | None) -> None:
        if "conditions" in fitted:
            self.vocabs = {k: CategoryVocab.from_dict(v) for k, v in fitted["conditions"].items()}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["alphabet"] = ALPHABET
        d["conditions"] = {k: len(v.categories) for k, v in (self.vocabs or {}).items()}
        return d
