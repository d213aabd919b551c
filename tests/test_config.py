"""Run configuration: shipped configs, type and key errors, data checks that fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_support import ROOT, TINY, run_train, tiny_args, tiny_shard_root

from maskdiff.bundle import load_bundle
from maskdiff.config import ConfigError, load_config, to_run_config
from maskdiff.data.loader import ensure_shards, open_sources

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    rc = to_run_config(load_config(path))
    assert rc.modalities and all(m in rc.schedules for m in rc.modalities)
    for mod in rc.modalities:  # every shard dir they name can be built from shipped data
        for name in rc.data.sources[mod].dirs:
            recipe = rc.data.build[name]
            assert recipe.modality == mod and all((ROOT / p).exists() for p in recipe.inputs)


def test_joint_config_covers_all_modalities() -> None:
    rc = to_run_config(load_config(ROOT / "configs" / "joint.yaml"))
    assert rc.modalities == ["text", "pixels", "protein", "tabular"]


def test_overrides_and_base_chain(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\ntrain: {{steps: 7}}\n")
    cfg = load_config(child, ["optim.lr=0.5", "schedules.tabular.kind=poly3"])
    rc = to_run_config(cfg)
    assert (rc.train.steps, rc.optim.lr, rc.schedules["tabular"].kind, rc.model.dim) == (7, 0.5, "poly3", 32)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.shuffle_bufer=3"], "data.shuffle_bufer"),
        (["train.steps=many"], "train.steps"),
        (["schedules.text.kind=cosinus"], "schedules.text.kind"),
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
        (["schedules.text.draws=1"], "schedules.text.draws"),
        (["data.sources.protein.weight=1.0", "schedules.protein.kind=linear"], "data.sources.protein.weight"),
        (["model.heads=3"], "model.heads"),
        (["train.condition_dropout=0.2"], "train.condition_fields"),
        (["train.condition_dropout=1.5", "train.condition_fields=[tabular/col:species]"], "train.condition_dropout"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(TINY, overrides)


def test_a_modality_without_a_schedule_takes_its_adapters_default() -> None:
    rc = to_run_config(load_config(TINY, ["data.sources.pixels.dirs=[mnist]"]))
    assert rc.schedules["pixels"].kind == "cosine"  # PixelsAdapter.default_schedule
    assert rc.schedules["tabular"].kind == "linear" and rc.schedules["text"].kind == "genmd4"  # named ones stay


def test_tensorboard_without_its_package_names_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="'train.tensorboard': needs the tensorboard package .*train.tensorboard=false"):
        load_config(TINY)
    assert not to_run_config(load_config(TINY, ["train.tensorboard=false"])).train.tensorboard


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("heldout: 0.1", "heldout: 0.1\n  held_out: 0.2"))
    with pytest.raises(ConfigError, match="unknown config key 'data.held_out'"):
        load_config(bad)


def test_mixing_weight_without_shards_message() -> None:
    with pytest.raises(ConfigError, match="mixing weight 2.0 for modality 'protein', which has no shard directories"):
        load_config(TINY, ["data.sources.protein.weight=2.0", "schedules.protein.kind=linear"])


def test_missing_shard_dir_without_recipe(tmp_path_factory: pytest.TempPathFactory) -> None:
    shards = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", "data.sources.tabular.dirs=[nowhere]"]))
    with pytest.raises(ConfigError, match=r"data.sources.tabular.dirs.*nowhere does not exist"):
        ensure_shards(rc, log=lambda _: None)


def test_shard_dir_of_another_modality(tmp_path_factory: pytest.TempPathFactory) -> None:
    shards = tiny_shard_root(tmp_path_factory)
    rc = to_run_config(load_config(TINY, [f"data.shard_root={shards}", "data.sources.tabular.dirs=[tiny-shakespeare]"]))
    with pytest.raises(ConfigError, match="tiny-shakespeare holds text shards, not tabular"):
        open_sources(rc, 0, 1)


def test_cli_user_errors_exit_2_with_one_line(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    res = run_train(["--config", str(TINY), "optim.lrr=1"], check=False)
    assert res.returncode == 2 and res.stderr.strip() == "error: overrides: unknown config key 'optim.lrr'"
    shards = tiny_shard_root(tmp_path_factory)
    res = run_train(tiny_args(shards, tmp_path / "run", "data.sources.tabular.dirs=[nowhere]"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "error: config key 'data.sources.tabular.dirs'" in res.stderr and "nowhere does not exist" in res.stderr


def test_cli_refuses_existing_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    res = run_train(tiny_args(tmp_path / "s", run), check=False)
    assert res.returncode == 2 and "already exists; pass --overwrite" in res.stderr
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_condition_dropout_trains_and_unknown_fields_are_refused(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    shards = tiny_shard_root(tmp_path_factory)
    drop = ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.condition_dropout=0.5"]
    res = run_train(tiny_args(shards, tmp_path / "ok", *drop, "train.condition_fields=[tabular/col:species]",
                              "model.condition_modulation=true"), check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    denoiser = load_bundle(tmp_path / "ok").denoiser  # the condition also modulates every block, and reloads so
    assert denoiser.cfg.condition_fields == ("tabular/col:species",) and all(b.ada is not None for b in denoiser.blocks)
    res = run_train(tiny_args(shards, tmp_path / "bad", *drop, "train.condition_fields=[tabular/col:colour]"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train.condition_fields: no field support 'tabular/col:colour'" in res.stderr
