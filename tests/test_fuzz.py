"""Fuzzing the readers of user files: arbitrary bytes give a rejection with a reason or a one-line error, never a crash.

Bounded (few examples, a deadline per example that flags a hang) to keep the suite fast.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from adapter_fixtures import SHAKESPEARE, built, scratch  # noqa: E402

from maskdiff.adapters import InputError, PixelsAdapter, ProteinAdapter, Reject, Rejected, TextAdapter  # noqa: E402
from maskdiff.bundle import BundleError, load_bundle  # noqa: E402
from maskdiff.config import ConfigError, load_config  # noqa: E402
from maskdiff.data.shards import ShardSet  # noqa: E402
from maskdiff.core.tokens import VocabMismatchError  # noqa: E402

FUZZ = settings(max_examples=60, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, database=None)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FASTA_BYTES = st.one_of(st.binary(max_size=400),
                        st.lists(st.sampled_from([b">", b"sp|P1|X", b" OS=Homo sapiens", b"\n", b"MKTLLV", b"\xef\xbb\xbf", b"*", b"\r\n", b"\x00", b"\xff"]),
                                 max_size=30).map(b"".join))


def _one_line(e: BaseException) -> None:
    assert str(e) and "\n" not in str(e), repr(e)


def _file(name: str, data: bytes) -> Path:
    d = scratch("fuzz-files")
    p = d / name
    p.write_bytes(data)
    return p


@FUZZ
@given(FASTA_BYTES)
def test_fasta(data: bytes) -> None:
    adapter = ProteinAdapter(max_len=64)
    try:
        items = list(adapter.read([_file("x.fasta", data)]))
    except InputError as e:
        return _one_line(e)
    raws = [raw for item in items if not isinstance(item, Rejected) for raw in [item[1]]]
    adapter.fit(raws)
    for raw in raws:
        try:
            adapter.encode_many(raw)
        except Reject as e:
            _one_line(e)


@pytest.fixture(scope="module")
def text_adapter() -> TextAdapter:
    adapter = TextAdapter(vocab_size=400, max_len=16)
    adapter.fit([SHAKESPEARE.read_text(encoding="utf-8")[:20000]])
    return adapter


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_text(text_adapter: TextAdapter, data: bytes) -> None:
    try:
        items = list(text_adapter.read([_file("x.txt", data)]))
    except InputError as e:
        return _one_line(e)
    for item in items:
        if isinstance(item, Rejected):
            continue
        try:
            windows = text_adapter.encode_many(item[1])
        except Reject as e:
            _one_line(e)
            continue
        assert "".join(text_adapter.decode(w) for w in windows) == item[1]


PNG = b"\x89PNG\r\n\x1a\n"


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", PNG, PNG + b"\x00\x00\x00\rIHDR", b"GIF89a", b"\xff\xd8\xff", b"BM"]))
def test_image(data: bytes, prefix: bytes) -> None:
    for name in ("x.png", "x.npy"):
        try:
            items = list(PixelsAdapter().read([_file(name, prefix + data)]))
        except InputError as e:
            _one_line(e)
            continue
        assert all(isinstance(i, Rejected) and i.reason or isinstance(i, tuple) for i in items)


# --- manifest and bundle readers: valid files with fuzzed values -----------------------------


def _set(doc: dict[str, Any], path: list[str], value: Any) -> None:
    """Replace (value not None) or delete the entry at ``path`` (list indices as digits)."""
    node: Any = doc
    for key in path[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = path[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


MANIFEST_PATHS = [["modality"], ["records_in"], ["samples_written"], ["adapter"], ["adapter", "state"], ["adapter", "fingerprint"],
                  ["vocab"], ["vocab", "supports"], ["vocab", "supports", "0"], ["shards"], ["shards", "0"], ["shards", "0", "file"],
                  ["shards", "0", "records"], ["shards", "0", "sha256"], ["format"], ["token_dtype"]]


@FUZZ
@given(st.sampled_from(MANIFEST_PATHS), JSON)
def test_manifest(path: list[str], value: Any) -> None:
    src = built("tabular")[0]
    d = scratch("fuzz-manifest") / "tab"
    shutil.copytree(src, d)
    m = json.loads((d / "manifest.json").read_text())
    _set(m, path, value)
    (d / "manifest.json").write_text(json.dumps(m))
    try:
        sum(1 for _ in ShardSet(d))
    except (InputError, VocabMismatchError) as e:
        _one_line(e)


@FUZZ
@given(st.binary(max_size=200))
def test_manifest_bytes(data: bytes) -> None:
    d = scratch("fuzz-manifest-bytes")
    (d / "manifest.json").write_bytes(data)
    with pytest.raises((InputError, VocabMismatchError)) as exc:
        ShardSet(d)
    _one_line(exc.value)


@pytest.fixture(scope="module")
def bundle_src() -> Path:
    from tasks_fixtures import tiny_bundle

    return tiny_bundle()


def _reseal(b: Path) -> None:
    info = json.loads((b / "bundle.json").read_text())
    if isinstance(info, dict) and isinstance(info.get("files"), dict):
        info["files"] = {n: hashlib.sha256((b / n).read_bytes()).hexdigest() for n in info["files"] if isinstance(n, str) and (b / n).is_file()}
        (b / "bundle.json").write_text(json.dumps(info))


BUNDLE_PATHS = [["format"], ["version"], ["vocab_fingerprint"], ["modalities"], ["modalities", "0"], ["files"], ["step"], ["lengths"]]
BUNDLE_FILES = ["model.safetensors", "vocab.json", "config.yaml", "adapters/text/state.json", "adapters/pixels/state.json"]


@FUZZ
@given(st.sampled_from(BUNDLE_PATHS), JSON)
def test_bundle_info(bundle_src: Path, path: list[str], value: Any) -> None:
    b = scratch("fuzz-bundle") / "bundle"
    shutil.copytree(bundle_src, b)
    info = json.loads((b / "bundle.json").read_text())
    _set(info, path, value)
    (b / "bundle.json").write_text(json.dumps(info))
    try:
        load_bundle(b)
    except BundleError as e:
        _one_line(e)


@FUZZ
@given(st.sampled_from(BUNDLE_FILES), st.binary(max_size=300), st.booleans())
def test_bundle_files(bundle_src: Path, name: str, data: bytes, reseal: bool) -> None:
    """Any file replaced by arbitrary bytes, with or without forged checksums: refused in one line."""
    b = scratch("fuzz-bundle-files") / "bundle"
    shutil.copytree(bundle_src, b)
    (b / name).write_bytes(data)
    if reseal:
        _reseal(b)
    with pytest.raises(BundleError) as exc:
        load_bundle(b)
    _one_line(exc.value)


@FUZZ
@given(st.text(max_size=300) | st.lists(st.sampled_from(["model:", " dim:", " 32", "\n", "base: ", "x.yaml", "train: {steps: ", "-1}", "[", "!!python/object:os.system", "&a", "*a"]),
                                        max_size=20).map("".join))
def test_config_loader(text: str) -> None:
    p = scratch("fuzz-config") / "c.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(p)
    except ConfigError as e:
        _one_line(e)


CSV_BYTES = st.one_of(st.binary(max_size=300),
                      st.lists(st.sampled_from([b"a,b,c\n", b"1,2,3\n", b"x,,NA\n", b'"q,1",2,\n', b"inf,1e400,-1\n", b"\xef\xbb\xbf", b"\r\n",
                                                b",,\n", b"1,2\n", b"\xff\xfe", b'"open\n', b"a,a,b\n", b"\x00"]), max_size=25).map(b"".join))


@FUZZ
@given(CSV_BYTES)
def test_csv_table(data: bytes) -> None:
    """The tabular adapter and the imputation reader: rows read or rejected with a reason, else one line."""
    from maskdiff.adapters import TabularAdapter
    from maskdiff.errors import UserError
    from maskdiff.data.tables import read_table

    path = _file("t.csv", data)
    adapter = TabularAdapter()
    try:
        items = list(adapter.read([path]))
        raws = [item[1] for item in items if not isinstance(item, Rejected)]
        adapter.fit(raws)
        for raw in raws:
            try:
                adapter.encode(raw)
            except Reject as e:
                _one_line(e)
    except InputError as e:
        _one_line(e)
    try:
        read_table(path, ",", ["NA"])
    except UserError as e:
        _one_line(e)


@FUZZ
@given(st.binary(max_size=200))
def test_parquet_table(data: bytes) -> None:
    from maskdiff.adapters import TabularAdapter
    from maskdiff.errors import UserError
    from maskdiff.data.tables import read_table

    path = _file("t.parquet", b"PAR1" + data)
    try:
        list(TabularAdapter().read([path]))
    except InputError as e:
        _one_line(e)
    try:
        read_table(path)
    except UserError as e:
        _one_line(e)
