"""Text adapter: lossless BPE round trips, windows, state, rejects."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from adapter_fixtures import SHAKESPEARE, read_all, scratch

from maskdiff.adapters import InputError, Reject, Rejected, TextAdapter, adapter_from_state
from maskdiff.core.tokens import VocabSpec


@pytest.fixture(scope="module")
def fitted() -> tuple[TextAdapter, str]:
    adapter, raws, rejects = read_all("text", [SHAKESPEARE], vocab_size=1000, max_len=128)
    assert rejects == [] and len(raws) == 1
    return adapter, raws[0][1]


def test_shakespeare_round_trips_through_windows(fitted):
    adapter, text = fitted
    assert text == SHAKESPEARE.read_text(encoding="utf-8")
    windows = adapter.encode_many(text)
    assert len(windows) > 100
    assert all(0 < len(w["text"].tokens) <= 128 for w in windows)
    assert [w.meta["window"] for w in windows] == list(range(len(windows)))
    assert all(w.meta["windows"] == len(windows) for w in windows)
    offsets = [w.meta["offset"] for w in windows]
    assert offsets[0] == 0 and all(b - a == len(w["text"].tokens) for a, b, w in zip(offsets, offsets[1:], windows))
    assert "".join(adapter.decode(w) for w in windows) == text
    assert adapter.supports()[0].name == "text/bpe" and adapter.supports()[0].size == 1000


def test_any_utf8_round_trips_and_windows_never_split_a_character(fitted):
    adapter, _ = fitted
    text = "  naïve café — 日本語のテキスト 🙂🙃 \t\r\n\n Ελληνικά  \x00 end "
    whole = adapter.encode(text)
    assert adapter.decode(whole) == text
    for max_len in (4, 5, 7, 16):
        adapter.max_len = max_len
        windows = adapter.encode_many(text)
        assert all(len(w["text"].tokens) <= max_len for w in windows)
        assert "".join(adapter.decode(w) for w in windows) == text, max_len
    adapter.max_len = 128


def test_unrepresentable_text_is_rejected_with_reason(fitted):
    adapter, _ = fitted
    with pytest.raises(Reject, match="round-trip"):
        adapter.encode("a \u2581 b")
    with pytest.raises(Reject, match="empty"):
        adapter.encode("")


def test_state_saved_as_file_and_embedded(fitted):
    adapter, text = fitted
    root = scratch("text-state")
    state = adapter.state(root)
    assert state["fitted"]["model_file"] == "text-bpe.model" and (root / "text-bpe.model").is_file()
    embedded = adapter.state(None)
    sample = text[:5000]
    for loaded in (adapter_from_state(state, root), TextAdapter.from_state(embedded)):
        assert np.array_equal(loaded.encode(sample)["text"].tokens, adapter.encode(sample)["text"].tokens)
        assert VocabSpec(loaded.supports()) == VocabSpec(adapter.supports())
        assert loaded.fingerprint() == adapter.fingerprint()
    clone = pickle.loads(pickle.dumps(adapter))
    assert clone.decode(adapter.encode(sample)) == sample


def test_existing_model_is_used_without_training(fitted):
    adapter, text = fitted
    root = scratch("text-model")
    adapter.state(root)
    reuse = TextAdapter(model=str(root / "text-bpe.model"))
    assert not reuse.needs_fit
    reuse.fit(iter(()))
    assert np.array_equal(reuse.encode(text[:2000])["text"].tokens, adapter.encode(text[:2000])["text"].tokens)
    with pytest.raises(InputError, match="sentencepiece model"):
        TextAdapter(model=str(SHAKESPEARE)).fit(iter(()))


def test_document_splitting_and_bad_files():
    root = scratch("text-split")
    (root / "a.txt").write_text("first line\n\nsecond para\nstill second\n\n\nthird\n")
    (root / "bad.txt").write_bytes(b"ok \xff\xfe not utf-8")
    (root / "empty.txt").write_bytes(b"")
    lines = list(TextAdapter(split="line").read([root / "a.txt"]))
    assert [r[1] for r in lines] == ["first line", "second para", "still second", "third"]
    assert lines[0][0].endswith("a.txt:1")
    paras = list(TextAdapter(split="paragraph").read([root / "a.txt"]))
    assert [r[1] for r in paras] == ["first line", "second para\nstill second", "third"]
    items = list(TextAdapter().read([root]))
    rejected = {r.id.rsplit("/", 1)[-1]: r.reason for r in items if isinstance(r, Rejected)}
    assert "UTF-8" in rejected["bad.txt"] and rejected["empty.txt"] == "empty document"
    with pytest.raises(InputError, match="empty"):
        list(TextAdapter().read([root / "empty.txt"]))
    with pytest.raises(InputError, match="too small"):
        TextAdapter(vocab_size=50)


def test_whitespace_only_document_is_rejected() -> None:
    d = scratch("text-blank")
    (d / "blank.txt").write_text("  \n\t\n   ")
    items = list(TextAdapter(vocab_size=300).read([d / "blank.txt"]))
    assert len(items) == 1 and isinstance(items[0], Rejected) and items[0].reason == "only whitespace"


def test_one_long_line_trains_and_round_trips() -> None:
    d = scratch("text-long-line")
    rng = np.random.default_rng(0)
    words = np.array(["the", "king", "queen", "night", "thou", "love"])
    text = " ".join(rng.choice(words, 60_000))  # ~300 KB on one line: far beyond sentencepiece's sentence limit
    (d / "long.txt").write_text(text)
    adapter, raws, rejects = read_all("text", [d / "long.txt"], vocab_size=300, max_len=64)
    assert rejects == [] and len(raws) == 1
    windows = adapter.encode_many(raws[0][1])
    assert "".join(adapter.decode(w) for w in windows) == text


def test_byte_order_mark_is_dropped() -> None:
    d = scratch("text-bom")
    (d / "bom.txt").write_bytes("\ufeffHello there\n".encode())
    items = list(TextAdapter(vocab_size=300).read([d / "bom.txt"]))
    assert items == [(str(d / "bom.txt"), "Hello there\n")]
