"""The modality registry: fixed ids for the built-ins (trained models depend on them), one entry per name."""

from __future__ import annotations

import pytest

from maskdiff.core import modalities
from maskdiff.adapters import ADAPTERS, TabularAdapter, register_adapter
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.tokens import Support, VocabSpec


def test_builtin_ids_are_the_order_saved_models_use() -> None:
    assert [modalities.modality_id(m) for m in ("text", "pixels", "protein", "tabular")] == [0, 1, 2, 3]
    assert modalities.names()[:4] == ("text", "pixels", "protein", "tabular") and list(ADAPTERS)[:4] == list(modalities.names()[:4])


def test_a_builtin_only_model_keeps_four_modality_rows() -> None:
    spec = VocabSpec([Support("pixels/value", "pixels", 256)])
    assert Denoiser(spec, DenoiserConfig(dim=16, depth=1, heads=2)).modality_emb.weight.shape == (modalities.MIN_EMBEDDING_ROWS, 16)


def test_adapters_declare_what_the_core_treats_specially() -> None:
    assert modalities.get("pixels").per_dim_support == "pixels/value" and modalities.get("tabular").per_dim_support is None
    assert {m for m in ("text", "pixels", "protein", "tabular") if modalities.get(m).keeps_lengths} == {"text", "protein"}
    assert all(modalities.get(m).schedule for m in ("text", "pixels", "protein", "tabular"))


def test_a_name_is_registered_once() -> None:
    register_adapter(TabularAdapter)  # the same again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        modalities.register(modalities.Modality("tabular", schedule="cosine"))
    class OtherTable(TabularAdapter):
        pass

    with pytest.raises(ValueError, match="already has the adapter TabularAdapter"):
        register_adapter(OtherTable)
    with pytest.raises(ValueError, match="unknown modality 'nope'"):
        Support("nope/x", "nope", 2)


def test_installed_packages_register_adapters_through_entry_points(capsys) -> None:
    from importlib.metadata import EntryPoint

    from maskdiff.adapters import register_installed

    group = "maskdiff.adapters"
    found = [EntryPoint("dna", "dna_adapter:DNAAdapter", group), EntryPoint("broken", "no_such_module_here:Adapter", group),
             EntryPoint("notanadapter", "json:dumps", group)]
    assert register_installed(found) == ["dna"]
    assert modalities.is_known("dna") and ADAPTERS["dna"].__name__ == "DNAAdapter"
    err = capsys.readouterr().err
    assert "'broken' (no_such_module_here:Adapter) not registered" in err and "json:dumps is not an Adapter subclass" in err
