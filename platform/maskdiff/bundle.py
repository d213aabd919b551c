"""The inference bundle: everything sampling needs, loadable without DeepSpeed or pickle.

Layout of a bundle directory::

    bundle.json          format, version, step, vocabulary fingerprint, metrics, files
    model.safetensors    float32 weights of the denoiser and the schedules (GenMD4's w)
    config.yaml          the resolved run configuration
    vocab.json           the vocabulary spec (global id layout)
    adapters/<source>/state.json (+ large fitted state, e.g. the BPE model); a source is a
                         modality, or <modality>/<data set> for a named table or FASTA set

:func:`load_bundle` verifies every file against the sha256 that ``bundle.json``
lists, rebuilds the :class:`~maskdiff.core.joint.JointModel` from the config and
spec, loads the weights strictly (all finite), and checks every adapter's
supports against the spec, so ids cannot silently shift. A bundle is written
to a staging directory and swapped into place, and weights that are not
finite are never exported.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maskdiff.adapters import Adapter, adapter_from_state

from .config import RunConfig, load_config, save_config, to_run_config
from .errors import BundleError, ConfigError, UserError
from .files import sha256_file, write_atomic
from maskdiff.core.joint import JointModel
from maskdiff.core import modalities
from maskdiff.core.tokens import VocabMismatchError, VocabSpec, source_key

FORMAT, VERSION = "maskdiff-bundle", 1
ENSEMBLE = "ensemble"  # bundle.json: paths (relative to the bundle) of further models whose conditionals are averaged
WEIGHTS, CONFIG, VOCAB, INFO, ADAPTERS = "model.safetensors", "config.yaml", "vocab.json", "bundle.json", "adapters"
SOURCES = "sources"  # bundle.json: the adapters' keys (a bundle without it has one adapter per modality, named by it)
MODALITY_IDS = "modality_ids"  # bundle.json: each modality's id (its modality-embedding row), checked on loading


CORE_KEYS = ("format", "version", "step", "vocab_fingerprint", "modalities", MODALITY_IDS, SOURCES, "parameters", "metrics", "lengths", "files")


@dataclass
class Bundle:
    model: JointModel
    cfg: DictConfig
    config: RunConfig
    spec: VocabSpec
    adapters: dict[str, Adapter]
    info: dict[str, Any]
    members: list[Bundle] = field(default_factory=list)  # further models of the same data (``ensemble`` in bundle.json)

    @property
    def modalities(self) -> list[str]:
        """The modalities the model learned (a modality may hold several data sets: :meth:`adapter`)."""
        return sorted({a.modality for a in self.adapters.values()})

    def adapter(self, modality: str, dataset: str | None = None) -> Adapter:
        """The adapter of ``modality``: the only one, or that of data set ``dataset`` (see :func:`adapter_of`)."""
        return adapter_of(self.adapters, modality, dataset)

    @property
    def denoiser(self):
        return self.model.denoiser

    @property
    def denoisers(self) -> list:
        """This model's denoiser and its ensemble members' (imputation averages their conditionals)."""
        return [self.denoiser] + [m.denoiser for m in self.members]

    @property
    def schedules(self):
        return self.model.schedules


def adapter_of(adapters: Mapping[str, Adapter], modality: str, dataset: str | None = None) -> Adapter:
    """The adapter of ``modality`` among a model's: the only one, or that of data set ``dataset`` when it learned several."""
    mine = {a.key: a for a in adapters.values() if a.modality == modality}
    if not mine:
        raise BundleError(f"the model was not trained on {modality} data; its modalities are {', '.join(sorted({a.modality for a in adapters.values()}))}")
    if dataset is None and len(mine) == 1:
        return next(iter(mine.values()))
    names = ", ".join(repr(a.options.get("dataset") or a.modality) for a in mine.values())
    if dataset is None:
        raise BundleError(f"the model learned several {modality} data sets ({names}); name one with --dataset")
    found = mine.get(source_key(modality, dataset)) or (mine.get(modality) if dataset == modality else None)
    if found is None:
        raise BundleError(f"the model has no {modality} data set {dataset!r}; it has {names}")
    return found


def export_bundle(out: str | Path, model: torch.nn.Module, cfg: DictConfig, spec: VocabSpec, adapters: Mapping[str, Adapter],
                  *, step: int, metrics: dict[str, Any] | None = None, lengths: dict[str, Any] | None = None) -> Path:
    """Write a bundle of ``model`` (a JointModel) to ``out`` (replacing an older one there).

    ``lengths`` (modality -> field -> {length: records}) records the training length
    distribution of variable-length fields, so generation needs no training shards.
    """
    out = Path(out)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    bad = next((k for k, v in weights.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise BundleError(f"{out}: not exported: weight {bad} is not finite (the training diverged)")
    stage = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        save_file(weights, str(stage / WEIGHTS), metadata={"format": FORMAT, "vocab": spec.fingerprint()})
        save_config(cfg, stage / CONFIG)
        spec.save(stage / VOCAB)
        for adapter in adapters.values():
            d = stage / ADAPTERS / adapter.key
            d.mkdir(parents=True, exist_ok=True)
            (d / "state.json").write_text(json.dumps(adapter.state(d), indent=1) + "\n")
        info = {"format": FORMAT, "version": VERSION, "step": step, "vocab_fingerprint": spec.fingerprint(),
                "modalities": sorted({a.modality for a in adapters.values()}), MODALITY_IDS: modalities.ids_of(spec.modalities),
                SOURCES: sorted(a.key for a in adapters.values()),
                "parameters": sum(v.numel() for v in weights.values()), "metrics": metrics or {}, "lengths": lengths or {},
                "files": {str(p.relative_to(stage)): sha256_file(p) for p in sorted(stage.rglob("*")) if p.is_file()}}
        (stage / INFO).write_text(json.dumps(info, indent=1, allow_nan=False) + "\n")
        _swap(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def annotate(path: str | Path, key: str, value: Any) -> None:
    """Add ``key: value`` to a bundle's ``bundle.json`` (what was learned about the model after export,
    e.g. the imputation calibration); the file is replaced atomically. The weights, config and
    vocabulary keep their checksums; the core keys cannot be overwritten."""
    root = Path(path)
    info = _read_info(root)
    if key in CORE_KEYS:
        raise BundleError(f"{root / INFO}: '{key}' is written by the export and cannot be replaced")
    info[key] = value
    write_atomic(root / INFO, json.dumps(info, indent=1, allow_nan=False) + "\n")


def _swap(stage: Path, out: Path) -> None:
    """Put ``stage`` at ``out``; an older bundle there is moved aside first and removed last."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None


def _read_info(root: Path) -> dict[str, Any]:
    info = _read_json(root / INFO)
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        raise BundleError(f"{root / INFO}: not a {FORMAT} v{VERSION} bundle")
    for key, kind in (("vocab_fingerprint", str), ("modalities", list), ("files", dict)):
        if not isinstance(info.get(key), kind):
            raise BundleError(f"{root / INFO}: key '{key}' is missing or not a {kind.__name__}")
    if not isinstance(info.get(SOURCES, []), list):
        raise BundleError(f"{root / INFO}: key '{SOURCES}' is not a list")
    if not isinstance(info.get(MODALITY_IDS, {}), dict):
        raise BundleError(f"{root / INFO}: key '{MODALITY_IDS}' is not a mapping")
    return info


def _verify_files(root: Path, files: dict[str, Any]) -> None:
    """Every file bundle.json lists exists inside the bundle and matches its sha256."""
    for name in (WEIGHTS, CONFIG, VOCAB):
        if name not in files:
            raise BundleError(f"{root / INFO}: lists no checksum for {name}")
    top = root.resolve()
    for name, digest in files.items():
        p = (root / name).resolve()
        if not p.is_relative_to(top):
            raise BundleError(f"{root / INFO}: file {name!r} is outside the bundle")
        if not p.is_file():
            raise BundleError(f"{root}: not a complete bundle ({name} is missing)")
        if sha256_file(p) != digest:
            raise BundleError(f"{root / name}: does not match its checksum in {INFO} (damaged or changed after export)")


def _read_config(path: Path) -> DictConfig:
    """A bundle's config is resolved: a ``base`` key would read another file, so it is refused."""
    try:
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise BundleError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: the top level must be a mapping")
    if "base" in raw:
        raise BundleError(f"{path}: a bundle's config must be resolved, without 'base'")
    try:
        return load_config(path)
    except ConfigError as e:
        raise BundleError(f"{path}: {str(e).removeprefix(str(path.resolve()) + ': ')}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise BundleError(f"{path}: weight {bad} is not finite; refusing to load a diverged model")
    return state


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory (a run directory's ``bundle/`` also works given the run directory)."""
    root = Path(path)
    if not (root / INFO).is_file() and (root / "bundle" / INFO).is_file():
        root = root / "bundle"
    if not (root / INFO).is_file():
        raise BundleError(f"{root}: not a bundle ({INFO} is missing)")
    info = _read_info(root)
    _verify_files(root, info["files"])
    try:
        spec = VocabSpec.load(root / VOCAB)
    except (ValueError, KeyError, TypeError, AttributeError, VocabMismatchError) as e:
        raise BundleError(f"{root / VOCAB}: not a vocabulary spec ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if spec.fingerprint() != info["vocab_fingerprint"]:
        raise BundleError(f"{root / VOCAB}: fingerprint {spec.fingerprint()} differs from bundle.json's {info['vocab_fingerprint']}")
    try:
        modalities.check_ids(info.get(MODALITY_IDS, {}))  # bundles without the key hold built-in modalities only
    except ValueError as e:
        raise BundleError(f"{root / INFO}: {e}") from None
    cfg = _read_config(root / CONFIG)
    config = to_run_config(cfg)
    adapters = {key: _load_adapter(root, spec, key) for key in info.get(SOURCES, info["modalities"])}
    model = JointModel(spec, config)
    state = _load_weights(root / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{root / WEIGHTS}: weights do not fit the configured model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    members = []
    for rel in info.get(ENSEMBLE, []):
        if not (root / rel / INFO).is_file():
            raise BundleError(f"{root / INFO}: ensemble member {rel} is not a bundle ({root / rel / INFO} is missing)")
        if _read_info(root / rel).get(ENSEMBLE):
            raise BundleError(f"{root / INFO}: ensemble member {rel} is not a single model")
        member = load_bundle(root / rel, device)
        if member.spec.fingerprint() != spec.fingerprint():
            raise BundleError(f"{root / INFO}: ensemble member {rel} is not a single model of the same vocabulary")
        members.append(member)
    return Bundle(model, cfg, config, spec, adapters, info, members)


def _load_adapter(root: Path, spec: VocabSpec, key: Any) -> Adapter:
    mod, _, dataset = str(key).partition("/")
    if not modalities.is_known(mod) or "/" in dataset or dataset.startswith("."):
        raise BundleError(f"{root / INFO}: {key!r} is not a source (a modality, or <modality>/<data set>)")
    d = root / ADAPTERS / str(key)
    state = _read_json(d / "state.json")
    if not isinstance(state, dict) or state.get("modality") != mod or (state.get("options") or {}).get("dataset") != (dataset or None):
        raise BundleError(f"{d / 'state.json'}: not the state of the {key} adapter")
    try:
        adapter = adapter_from_state(state, d)
        supports = adapter.supports()
    except BundleError:
        raise
    except Exception as e:  # a damaged state may fail in any adapter's own way; checksums catch most before
        raise BundleError(f"{d / 'state.json'}: cannot rebuild the {mod} adapter ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    for s in supports:
        if s.name not in spec.index:
            raise BundleError(f"{d}: adapter support {s.name!r} is not in the vocabulary spec")
        if spec.support(s.name) != s:
            raise BundleError(f"{d}: adapter support {s} differs from the vocabulary spec's {spec.support(s.name)}")
    return adapter


def open_bundle(path: str | Path, modality: str | None = None, device: str = "cpu") -> Bundle:
    """Load a bundle, with a one-line :class:`UserError` for a missing one or a missing modality."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such bundle directory (train one with tools/train.py; it writes runs/<name>/bundle)")
    bundle = load_bundle(p, device=device)
    if modality is not None and modality not in bundle.modalities:
        raise UserError(f"{p}: the model was not trained on {modality} data; its modalities are {', '.join(bundle.modalities)}")
    return bundle


__all__ = ["Bundle", "BundleError", "adapter_of", "export_bundle", "load_bundle", "open_bundle"]
