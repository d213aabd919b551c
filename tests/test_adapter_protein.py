"""Protein adapter: exact round trips of the shipped FASTA files, headers, policies, rejects."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from adapter_fixtures import PRJEB85, UNIPROT, read_all, scratch
from Bio import SeqIO

from maskdiff.adapters import InputError, ProteinAdapter, Reject, Rejected, adapter_from_state
from maskdiff.adapters.protein import ALPHABET, parse_header
from maskdiff.core.tokens import MISSING


def _biopython_records(path):
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        return [(r.id, str(r.seq)) for r in SeqIO.parse(f, "fasta")]


def test_shipped_fasta_round_trips_exactly():
    adapter, raws, rejects = read_all("protein", [PRJEB85, UNIPROT], max_len=100_000)
    expected = _biopython_records(PRJEB85) + _biopython_records(UNIPROT)
    assert rejects == [] and len(raws) == len(expected) == 4100
    assert [s.name for s in adapter.supports()][:1] == ["protein/residue"] and adapter.supports()[0].size == 25
    stops = 0
    for (rid, raw), (seq_id, seq) in zip(raws, expected):
        rec = adapter.encode(raw)
        stops += bool(rec.meta.get("stop"))
        assert rec["sequence"].shape == (len(seq) - seq.endswith("*"),)
        back = adapter.decode(rec)
        assert back["sequence"] == seq and back["id"] == seq_id and rid.endswith(seq_id)
        assert "crop" not in rec.meta
    assert stops >= 2000  # the Prodigal file writes a terminal stop on (nearly) every protein


def test_uniprot_headers_become_conditioning_fields():
    adapter, raws, _ = read_all("protein", [UNIPROT])
    assert sorted(adapter.vocabs) == ["OS", "PE"]  # auto: OX is absent from this file
    names = {s.name: s.size for s in adapter.supports()}
    assert names["protein/PE"] == 6 and 2 <= names["protein/OS"] <= 1001
    rid, raw = raws[0]  # >tr|W0FSK4|W0FSK4_9FLAV Genome polyprotein (Fragment) OS=Dengue virus 3 PE=4 SV=1 Split=0
    rec = adapter.encode(raw)
    assert [f.name for f in rec.fields] == ["sequence", "OS", "PE"] and rec["OS"].shape == (1,)
    assert rec.meta["header"]["accession"] == "W0FSK4" and rec.meta["header"]["OS"] == "Dengue virus 3"
    assert adapter.decode(rec)["conditions"] == {"OS": "Dengue virus 3", "PE": "4"}
    chosen = ProteinAdapter(condition="GN")
    chosen.fit(r for _, r in raws)
    missing = next(r for _, r in raws if "GN=" not in r["description"])
    assert chosen.encode(missing)["GN"].tokens[0] == MISSING
    assert adapter_from_state(adapter.state()).fingerprint() == adapter.fingerprint()


def test_parse_header_uniprot_and_gene_caller_styles():
    h = parse_header("tr|W0FSK4|W0FSK4_9FLAV", "tr|W0FSK4|W0FSK4_9FLAV Genome polyprotein (Fragment) OS=Dengue virus 3 OX=12 GN=x y PE=4 SV=1")
    assert h == {"db": "tr", "accession": "W0FSK4", "entry": "W0FSK4_9FLAV", "OS": "Dengue virus 3", "OX": "12", "GN": "x y", "PE": "4", "SV": "1"}
    p = parse_header("seq_1", "seq_1 # 204 # 629 # -1 # ID=1_1;partial=00;start_type=ATG;gc_cont=0.319")
    assert p == {"ID": "1_1", "partial": "00", "start_type": "ATG", "gc_cont": "0.319"}


def test_bad_records_are_rejected_and_length_policies():
    root = scratch("protein-bad")
    good = _biopython_records(UNIPROT)[0][1]
    text = (
        f">ok1 OS=A\n{good[:60]}\n{good[60:120]}\n"
        ">illegal OS=A\nMKVJJ1LL\n"
        ">inner_stop\nMKV*LLA\n"
        ">lower OS=B\nmkvlla\n"
        ">gap\nMK-VL\n"
        ">empty\n\n"
        f">long\n{good}\n"
        ">truncated_at_end OS=B"
    )
    (root / "bad.fasta").write_text(text)
    adapter = ProteinAdapter(max_len=100)
    items = list(adapter.read([root / "bad.fasta"]))
    assert len(items) == 8 and not any(isinstance(i, Rejected) for i in items)
    adapter.fit(raw for _, raw in items)
    reasons = {}
    for rid, raw in items:
        try:
            adapter.encode(raw)
        except Reject as e:
            reasons[raw["id"]] = str(e)
    assert set(reasons) == {"illegal", "inner_stop", "gap", "empty", "truncated_at_end"}
    assert "unknown residue letters '1J'" in reasons["illegal"] and "position 4" in reasons["illegal"]
    assert "stop symbol '*' inside" in reasons["inner_stop"] and "'-'" in reasons["gap"]
    assert "empty sequence" in reasons["empty"] and "empty sequence" in reasons["truncated_at_end"]
    long = dict(items)[next(k for k in dict(items) if k.endswith(":long"))]
    rec = adapter.encode(long)
    assert rec.meta["crop"] == {"start": 0, "end": 100, "length": len(good)} and adapter.decode(rec)["sequence"] == good[:100]
    with pytest.raises(Reject, match=f"length {len(good)} exceeds --max-len 100"):
        ProteinAdapter(max_len=100, length_policy="reject", condition="none").encode(long)
    lower = next(raw for _, raw in items if raw["id"] == "lower")
    assert adapter.decode(adapter.encode(lower))["sequence"] == "MKVLLA"
    with pytest.raises(Reject, match="stop=reject"):
        ProteinAdapter(stop="reject", condition="none").encode({"id": "s", "description": "s", "sequence": "MK*"})
    tokens = ProteinAdapter(condition="none").encode({"id": "a", "description": "a", "sequence": ALPHABET})["sequence"].tokens
    assert np.array_equal(tokens, np.arange(25))


def test_files_that_are_not_fasta_are_fatal():
    root = scratch("protein-notfasta")
    (root / "notes.txt").write_text("some notes\n>x\nMK\n")
    (root / "blank.fasta").write_text("\n\n")
    (root / "empty.fasta").write_bytes(b"")
    with pytest.raises(InputError, match="notes.txt: not valid FASTA"):
        list(ProteinAdapter().read([root / "notes.txt"]))
    with pytest.raises(InputError, match="blank.fasta: holds no FASTA record"):
        list(ProteinAdapter().read([root / "blank.fasta"]))
    with pytest.raises(InputError, match="empty.fasta: file is empty"):
        list(ProteinAdapter().read([root / "empty.fasta"]))
    with pytest.raises(InputError, match="missing.fasta: no such file"):
        list(ProteinAdapter().read([root / "missing.fasta"]))


def test_fasta_with_a_byte_order_mark_is_read() -> None:
    d = scratch("protein-bom")
    (d / "bom.fasta").write_bytes("\ufeff>sp|P1|X OS=Homo sapiens\nMKTLLV\n>P2\nACDE\n".encode())
    items = list(ProteinAdapter().read([d / "bom.fasta"]))
    assert [raw["sequence"] for _, raw in items] == ["MKTLLV", "ACDE"]
