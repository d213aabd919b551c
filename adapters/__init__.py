"""Modality adapters: raw files to shared token records and back.

``get_adapter("protein", max_len=512)`` builds an adapter (its ``read(paths)``
gives raw records: ``(record_id, raw)`` pairs or :class:`Rejected`);
``ADAPTERS`` maps each modality to its class.

A new modality is one :class:`Adapter` subclass passed to :func:`register_adapter`
(before its shards are written or read): that enters its modality, with the
defaults the class declares, in :mod:`maskdiff.core.modalities`. An installed
package registers its adapter for every command by declaring it as an entry
point of the group ``maskdiff.adapters`` (in its pyproject.toml:
``[project.entry-points."maskdiff.adapters"] dna = "mypackage.dna:DnaAdapter"``).
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from maskdiff.core import modalities

from .base import OTHER, Adapter, CategoryVocab, InputError, Option, RawItem, Reject, Rejected
from .pixels import PixelsAdapter
from .protein import ProteinAdapter
from .tabular import TabularAdapter
from .text import TextAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Make ``cls`` the adapter of its modality, and enter the modality in the registry."""
    known = ADAPTERS.get(cls.modality, cls)
    if known is not cls:
        raise ValueError(f"modality {cls.modality!r} already has the adapter {known.__name__}")
    modalities.register(modalities.Modality(cls.modality, cls.default_schedule, cls.per_dim_support, cls.keeps_lengths))
    ADAPTERS[cls.modality] = cls
    return cls


# This order fixes the built-in modalities' ids, which trained models depend on: never reorder.
for _builtin in (TextAdapter, PixelsAdapter, ProteinAdapter, TabularAdapter):
    register_adapter(_builtin)


def register_installed(found: list[EntryPoint] | None = None) -> list[str]:
    """Register the adapters installed packages declare (group ``maskdiff.adapters``), in entry-point name
    order so that their modality ids do not depend on the order packages were installed in. One that
    fails to load is reported on stderr and skipped: a broken plugin must not stop every command."""
    registered = []
    for ep in sorted(entry_points(group="maskdiff.adapters") if found is None else found, key=lambda e: e.name):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Adapter)):
                raise TypeError(f"{ep.value} is not an Adapter subclass")
            register_adapter(cls)
        except Exception as e:  # noqa: BLE001  (whatever a third-party module raises on import)
            print(f"maskdiff: adapter entry point {ep.name!r} ({ep.value}) not registered: {e}", file=sys.stderr)
            continue
        registered.append(cls.modality)
    return registered


register_installed()


def adapter_class(modality: str) -> type[Adapter]:
    try:
        return ADAPTERS[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; known: {sorted(ADAPTERS)}") from None


def get_adapter(modality: str, **options: Any) -> Adapter:
    """A new (unfitted) adapter of ``modality`` built with ``options``."""
    return adapter_class(modality)(**options)


def adapter_from_state(state: dict[str, Any], root_dir: str | Path | None = None) -> Adapter:
    """Rebuild a fitted adapter from :meth:`Adapter.state` output."""
    return adapter_class(state["modality"]).from_state(state, root_dir)


__all__ = [
    "ADAPTERS", "OTHER", "Adapter", "CategoryVocab", "InputError", "Option", "RawItem", "Reject", "Rejected",
    "PixelsAdapter", "ProteinAdapter", "TabularAdapter", "TextAdapter",
    "adapter_class", "adapter_from_state", "get_adapter", "register_adapter", "register_installed",
]
