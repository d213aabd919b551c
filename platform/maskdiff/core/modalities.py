"""The modality registry: the one place the core learns which modalities exist.

An adapter class declares its modality (name, default masking schedule, and the
few things evaluation and the bundle treat specially) and
:func:`maskdiff.adapters.register_adapter` enters it here; the core asks this
registry instead of naming modalities.

A modality's id is its registration order. Ids index the model's modality
embedding, so they are part of every trained model: the built-in adapters
register first, always in the same order (text, pixels, protein, tabular; see
:mod:`maskdiff.adapters`), and a new modality takes the next free id.
"""

from __future__ import annotations

from dataclasses import dataclass

# Models saved before this registry have one modality-embedding row per built-in modality.
MIN_EMBEDDING_ROWS = 4


@dataclass(frozen=True)
class Modality:
    """What the core needs to know about one modality."""

    name: str
    schedule: str | None = None  # masking schedule kind of a run configuration that names none
    per_dim_support: str | None = None  # support reported as bits/dim (an image's values), if any
    keeps_lengths: bool = False  # the bundle keeps its training length distribution (to draw lengths when generating)


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> int:
    """Enter ``modality`` (again: a no-op when unchanged) and return its id."""
    known = _registry().get(modality.name)
    if known is not None and known != modality:
        raise ValueError(f"modality {modality.name!r} is already registered as {known}")
    if "/" in modality.name or not modality.name:
        raise ValueError(f"modality name {modality.name!r} must be non-empty and hold no '/'")
    _REGISTRY.setdefault(modality.name, modality)
    return modality_id(modality.name)


def _registry() -> dict[str, Modality]:
    if not _REGISTRY:
        import maskdiff.adapters  # noqa: F401  (registers the built-in modalities, in their fixed order)
    return _REGISTRY


def names() -> tuple[str, ...]:
    """Every registered modality, in id order."""
    return tuple(_registry())


def is_known(name: str) -> bool:
    return name in _registry()


def get(name: str) -> Modality:
    try:
        return _registry()[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(names())}") from None


def modality_id(name: str) -> int:
    get(name)
    return names().index(name)


def ids_of(modality_names: list[str]) -> dict[str, int]:
    """Name -> id of these modalities: what a saved model records, to be checked by :func:`check_ids` on loading."""
    return {m: modality_id(m) for m in modality_names}


def check_ids(saved: dict[str, int]) -> None:
    """Raise ValueError unless each saved modality has its saved id here (extra modalities take their ids
    from the order their adapters were registered in)."""
    moved = {m: i for m, i in saved.items() if not is_known(m) or modality_id(m) != i}
    if moved:
        now = {m: modality_id(m) if is_known(m) else None for m in moved}
        raise ValueError(f"modality ids differ from the model's ({moved} saved, {now} now): register the adapters in the order "
                         f"the model was trained with")


def embedding_rows(modality_names: list[str]) -> int:
    """Rows of a modality embedding that serves these modalities (never fewer than older models had)."""
    return max([MIN_EMBEDDING_ROWS] + [modality_id(m) + 1 for m in modality_names])


__all__ = ["MIN_EMBEDDING_ROWS", "Modality", "check_ids", "embedding_rows", "get", "ids_of", "is_known", "modality_id", "names", "register"]
