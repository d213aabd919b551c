"""The inference bundle: everything sampling needs, loadable without DeepSpeed or pickle.

Layout of a bundle directory::

    bundle.json          format, version, step, vocabulary fingerprint, metrics, files
    model.safetensors    float32 weights of the denoiser and the schedules (GenMD4's w)
    config.yaml          the resolved run configuration
    vocab.json           the vocabulary spec (global id layout)
    adapters/<modality>/state.json (+ large fitted state, e.g. the BPE model)

:func:`load_bundle` rebuilds the :class:`~maskdiff.joint.JointModel` from the
config and spec, loads the weights strictly, and checks every adapter's
supports against the spec, so ids cannot silently shift.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from maskdiff.adapters import Adapter, adapter_from_state

from .config import RunConfig, load_config, save_config, to_run_config
from .joint import JointModel
from .tokens import VocabSpec

FORMAT, VERSION = "maskdiff-bundle", 1
WEIGHTS, CONFIG, VOCAB, INFO, ADAPTERS = "model.safetensors", "config.yaml", "vocab.json", "bundle.json", "adapters"


class BundleError(ValueError):
    """A bundle directory is missing, incomplete or inconsistent; the message names the file."""


@dataclass
class Bundle:
    model: JointModel
    cfg: DictConfig
    config: RunConfig
    spec: VocabSpec
    adapters: dict[str, Adapter]
    info: dict[str, Any]

    @property
    def denoiser(self):
        return self.model.denoiser

    @property
    def schedules(self):
        return self.model.schedules


def export_bundle(out: str | Path, model: torch.nn.Module, cfg: DictConfig, spec: VocabSpec, adapters: Mapping[str, Adapter],
                  *, step: int, metrics: dict[str, Any] | None = None, lengths: dict[str, Any] | None = None) -> Path:
    """Write a bundle of ``model`` (a JointModel) to ``out`` (replacing an older one there).

    ``lengths`` (modality -> field -> {length: records}) records the training length
    distribution of variable-length fields, so generation needs no training shards.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / WEIGHTS), metadata={"format": FORMAT, "vocab": spec.fingerprint()})
    save_config(cfg, out / CONFIG)
    spec.save(out / VOCAB)
    for mod, adapter in adapters.items():
        d = out / ADAPTERS / mod
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").write_text(json.dumps(adapter.state(d), indent=1) + "\n")
    info = {"format": FORMAT, "version": VERSION, "step": step, "vocab_fingerprint": spec.fingerprint(), "modalities": sorted(adapters),
            "parameters": sum(v.numel() for v in weights.values()), "metrics": metrics or {}, "lengths": lengths or {}}
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory (a run directory's ``bundle/`` also works given the run directory)."""
    root = Path(path)
    if not (root / INFO).is_file() and (root / "bundle" / INFO).is_file():
        root = root / "bundle"
    for name in (INFO, WEIGHTS, CONFIG, VOCAB):
        if not (root / name).is_file():
            raise BundleError(f"{root}: not a bundle ({name} is missing)")
    info = json.loads((root / INFO).read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise BundleError(f"{root / INFO}: not a {FORMAT} v{VERSION} bundle")
    spec = VocabSpec.load(root / VOCAB)
    if spec.fingerprint() != info["vocab_fingerprint"]:
        raise BundleError(f"{root / VOCAB}: fingerprint {spec.fingerprint()} differs from bundle.json's {info['vocab_fingerprint']}")
    cfg = load_config(root / CONFIG)
    config = to_run_config(cfg)
    adapters = {}
    for mod in info["modalities"]:
        d = root / ADAPTERS / mod
        adapter = adapter_from_state(json.loads((d / "state.json").read_text()), d)
        for s in adapter.supports():
            if spec.support(s.name) != s:
                raise BundleError(f"{d}: adapter support {s} differs from the vocabulary spec's {spec.support(s.name)}")
        adapters[mod] = adapter
    model = JointModel(spec, config)
    state = load_file(str(root / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{root / WEIGHTS}: weights do not fit the configured model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return Bundle(model, cfg, config, spec, adapters, info)


__all__ = ["Bundle", "BundleError", "export_bundle", "load_bundle"]
