"""The inference bundle: safetensors weights, config, vocabulary and adapters; no DeepSpeed needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_support import ROOT, run_train, tiny_args, tiny_shard_root

from maskdiff.core.batch import collate, split
from maskdiff.bundle import BundleError, load_bundle
from maskdiff.core.sampler import sample
from maskdiff.data.shards import ShardSet
from maskdiff.core.tokens import VocabMismatchError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    shards = tiny_shard_root(tmp_path_factory)
    run = tmp_path_factory.mktemp("bundle") / "run"
    run_train(tiny_args(shards, run, "train.steps=6", "train.log_every=3", "train.eval_every=6", "train.checkpoint_every=6"))
    return run, shards


def test_loads_without_deepspeed(run: tuple[Path, Path]) -> None:
    code = (
        "import sys; from maskdiff.bundle import load_bundle; b = load_bundle(sys.argv[1]);"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported';"
        "print(b.info['step'], b.modalities, b.model.w_stats()['text']['mean'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run[0])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    step, _, mean = out.stdout.split(" ", 2)[0], None, float(out.stdout.split()[-1])
    assert step == "6" and "['tabular', 'text']" in out.stdout and mean != 1.0


def test_weights_match_the_final_checkpoint(run: tuple[Path, Path]) -> None:
    bundle = load_bundle(run[0])
    ckpt = torch.load(run[0] / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    state = bundle.model.state_dict()
    assert state.keys() == ckpt.keys()
    for k, v in ckpt.items():
        torch.testing.assert_close(state[k], v.float(), msg=k)


def test_adapters_decode_and_sampling_works(run: tuple[Path, Path]) -> None:
    bundle = load_bundle(run[0] / "bundle")
    shards = ShardSet(run[1] / "tiny-penguins")
    records = [r for _, r in zip(range(4), shards)]
    for rec in records:
        assert bundle.adapter("tabular").decode(rec) == shards.decode(rec)
    batch = collate(records, bundle.spec)
    keep = batch.support_ids == bundle.spec.support_id("tabular/tiny-penguins/col:species")  # named by its shard directory
    masked = batch.with_tokens(torch.where(keep | batch.pad, batch.tokens, bundle.spec.mask_id))
    out = sample(bundle.denoiser, masked, bundle.schedules, steps=4, generator=torch.Generator().manual_seed(0))
    filled = split(batch, records, bundle.spec, out.tokens)  # raises if any id left its field's support
    assert all(r["col:species"].tokens.tolist() == o["col:species"].tokens.tolist() for r, o in zip(records, filled))
    assert all(bundle.adapter("tabular").decode(r) for r in filled)


def test_inconsistent_bundle_is_refused(run: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(run[0] / "bundle", copy)
    vocab = json.loads((copy / "vocab.json").read_text())
    vocab["supports"][-1]["size"] += 1
    (copy / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises((BundleError, VocabMismatchError)):
        load_bundle(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors is missing"):
        load_bundle(copy)


def test_bundle_carries_the_training_length_distribution(run: tuple[Path, Path]) -> None:
    from maskdiff.tasks.generation import length_sampler
    from maskdiff.data.split import training_records

    bundle = load_bundle(run[0] / "bundle")
    stored = bundle.info["lengths"]["text"]["text"]
    windows = list(training_records(ShardSet(run[1] / "tiny-shakespeare"), bundle.config.data.heldout))
    assert sum(stored.values()) == len(windows) and len(stored) > 1  # the last window of a document is shorter
    assert "tabular" not in bundle.info["lengths"]  # fixed-length records need no distribution
    draws = length_sampler(bundle, "text", "text")  # from the bundle alone: no shard directory needed
    assert sorted(set(draws.tolist())) == sorted(int(n) for n in stored)


def test_annotations_and_ensemble_members(run: tuple[Path, Path], tmp_path: Path) -> None:
    from maskdiff.bundle import ENSEMBLE, annotate

    main, member = tmp_path / "model" / "bundle", tmp_path / "model-2" / "bundle"
    shutil.copytree(run[0] / "bundle", main)
    shutil.copytree(run[0] / "bundle", member)
    annotate(main, ENSEMBLE, ["../../model-2/bundle"])
    annotate(main, "note", {"a": 1})
    loaded = load_bundle(main)
    assert loaded.info["note"] == {"a": 1} and len(loaded.members) == 1 and len(loaded.denoisers) == 2
    with pytest.raises(BundleError, match="cannot be replaced"):
        annotate(main, "files", {})
    annotate(member, ENSEMBLE, ["."])  # a member must be a single model
    with pytest.raises(BundleError, match="not a single model"):
        load_bundle(main)
    shutil.rmtree(member)
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(main)
