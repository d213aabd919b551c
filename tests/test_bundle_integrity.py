"""Bundle files are checksummed, parsed safely and refused in one line when damaged, diverged or crafted."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from adapter_fixtures import scratch
from safetensors.torch import load_file, save_file
from tasks_fixtures import run_tool, tiny_bundle

from maskdiff.bundle import BundleError, export_bundle, load_bundle


def copy_of(name: str) -> Path:
    out = scratch(f"integrity-{name}") / "bundle"
    shutil.copytree(tiny_bundle(), out)
    return out


def reseal(bundle: Path) -> None:
    """Make bundle.json's checksums match the files again (as a deliberate forger would)."""
    info = json.loads((bundle / "bundle.json").read_text())
    info["files"] = {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in info["files"] if (bundle / name).is_file()}
    (bundle / "bundle.json").write_text(json.dumps(info))


def refused(bundle: Path, *words: str) -> str:
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bundle_lists_checksums_and_loads() -> None:
    info = json.loads((tiny_bundle() / "bundle.json").read_text())
    assert {"model.safetensors", "config.yaml", "vocab.json"} <= set(info["files"])
    assert load_bundle(tiny_bundle()).info["step"] == info["step"]


def test_a_flipped_weight_byte_is_caught() -> None:
    b = copy_of("flip")
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (b / "model.safetensors").write_bytes(bytes(data))
    refused(b, "model.safetensors", "does not match its checksum")


@pytest.mark.parametrize("damage", ["truncated", "bad-header", "empty"])
def test_unreadable_safetensors_is_one_line(damage: str) -> None:
    b = copy_of(damage)
    w = b / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "bad-header": b"\xff" * 8 + b"{not json" + data[17:], "empty": b""}[damage])
    reseal(b)
    refused(b, "model.safetensors", "not a readable safetensors file")


def test_non_finite_weights_are_refused_on_load() -> None:
    b = copy_of("nan")
    state = load_file(str(b / "model.safetensors"))
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(b / "model.safetensors"))
    reseal(b)
    refused(b, key, "not finite")


def test_non_finite_weights_are_never_exported(tmp_path: Path) -> None:
    good = load_bundle(tiny_bundle())
    with torch.no_grad():
        next(good.model.parameters()).fill_(float("inf"))
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="not finite"):
        export_bundle(out, good.model, good.cfg, good.spec, good.adapters, step=1)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_replaces_a_bundle_whole(tmp_path: Path) -> None:
    b = load_bundle(tiny_bundle())
    out = tmp_path / "bundle"
    export_bundle(out, b.model, b.cfg, b.spec, b.adapters, step=1)
    (out / "stray.txt").write_text("from the old bundle")
    export_bundle(out, b.model, b.cfg, b.spec, b.adapters, step=2)
    assert not (out / "stray.txt").exists() and load_bundle(out).info["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left


@pytest.mark.parametrize("text, words", [
    ("{not json", ["bundle.json", "not valid JSON"]),
    ("[1, 2]", ["bundle.json", "not a maskdiff-bundle"]),
    ('{"format": "maskdiff-bundle", "version": 1}', ["bundle.json", "key 'vocab_fingerprint'"]),
    ("\udcff", ["bundle.json"]),
])
def test_bad_bundle_json(text: str, words: list[str]) -> None:
    b = copy_of("info")
    (b / "bundle.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(b, *words)


def test_missing_and_corrupt_adapter_state() -> None:
    b = copy_of("state")
    state = b / "adapters" / "text" / "state.json"
    state.write_text("{truncated")
    reseal(b)
    refused(b, "state.json", "not valid JSON")
    state.write_text(json.dumps({"modality": "text"}))
    reseal(b)
    refused(b, "state.json", "cannot rebuild the text adapter")
    state.unlink()
    refused(b, "adapters/text/state.json is missing")


def test_config_naming_a_base_file_is_refused_without_printing_it() -> None:
    b = copy_of("base")
    (b / "config.yaml").write_text("base: /etc/passwd\n" + (b / "config.yaml").read_text())
    reseal(b)
    msg = refused(b, "config.yaml", "without 'base'")
    assert "root" not in msg


def test_listed_files_stay_inside_the_bundle() -> None:
    b = copy_of("escape")
    info = json.loads((b / "bundle.json").read_text())
    info["files"]["../../outside"] = "0" * 64
    (b / "bundle.json").write_text(json.dumps(info))
    refused(b, "outside the bundle")


def test_tools_refuse_a_diverged_bundle_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    b = copy_of("nan-tool")
    state = load_file(str(b / "model.safetensors"))
    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    save_file(state, str(b / "model.safetensors"))
    reseal(b)
    out = b.parent / "g.png"
    code, _, err = run_tool(capsys, "sample", "--model", b, "--num", "2", "--output", out, "--steps", "2", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not finite" in err and not out.exists()
