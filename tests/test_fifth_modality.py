"""A modality the core has never heard of (tests/dna_adapter.py) is sharded, trained together with a
table, evaluated and sampled through the ordinary paths: registering its adapter is the only step."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dna_adapter import BASES, write_dna
from training_support import ROOT, TINY, env, metrics

from maskdiff.bundle import Bundle, BundleError, load_bundle
from maskdiff.tasks.evaluation import evaluate_records, shard_records, summarise
from maskdiff.tasks.generation import fill
from maskdiff.core.modalities import MIN_EMBEDDING_ROWS, modality_id
from maskdiff.core.sampler import SamplerOptions
from maskdiff.core.tokens import MISSING, Field, Record

pytestmark = pytest.mark.slow
# tools/train.py, with the DNA adapter registered first (as a user's own adapter module would be)
TRAIN_WITH_DNA = [sys.executable, "-c", "import sys, dna_adapter; from maskdiff.commands.train import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dna-joint")
    config = tmp / "dna.yaml"
    config.write_text(f"""base: {TINY}
data:
  sources:
    text: {{weight: 0.0}}
    dna: {{dirs: [dna], weight: 1.0}}
  build:
    dna: {{modality: dna, inputs: [{write_dna(tmp / "dna.txt")}]}}
  shard_root: {tmp / "shards"}
run_dir: {tmp / "run"}
train: {{steps: 6, log_every: 2, eval_every: 3, eval_batches: 1, checkpoint_every: 6, plots: false, tensorboard: false}}
""")  # no schedule named for dna: the adapter's default applies
    res = subprocess.run(TRAIN_WITH_DNA + ["--config", str(config), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env(), "PYTHONPATH": str(ROOT / "tests")})
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp


@pytest.fixture(scope="module")
def bundle(run: Path) -> Bundle:
    return load_bundle(run / "run" / "bundle")


def test_trains_jointly_with_a_builtin_modality(run: Path, bundle: Bundle) -> None:
    assert bundle.config.modalities == ["tabular", "dna"]
    assert bundle.config.schedules["dna"].kind == "cosine"  # DNAAdapter.default_schedule
    heldout = metrics(run / "run", "eval")[-1]["bits_per_token"]
    assert set(heldout) == {"tabular", "dna"} and all(math.isfinite(v) and v > 0 for v in heldout.values())
    assert "sequence" in bundle.info["lengths"]["dna"]  # keeps_lengths


def test_takes_the_next_embedding_row_and_keeps_the_builtin_rows(bundle: Bundle) -> None:
    emb = bundle.model.denoiser.modality_emb.weight
    assert modality_id("dna") == MIN_EMBEDDING_ROWS == 4 and emb.shape[0] == 5
    assert modality_id("tabular") == 3


def test_a_bundle_refuses_modality_ids_that_moved(run: Path, tmp_path: Path) -> None:
    """Extra modalities take ids in registration order; a model whose ids differ from this process's would read the wrong rows."""
    moved = shutil.copytree(run / "run" / "bundle", tmp_path / "bundle")
    info = json.loads((moved / "bundle.json").read_text())
    assert info["modality_ids"] == {"tabular": 3, "dna": 4}
    info["modality_ids"]["dna"] = 5
    (moved / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="register the adapters in the order"):
        load_bundle(moved)


def test_evaluates_bits_per_token_under_its_name(run: Path, bundle: Bundle) -> None:
    by_mod, _ = shard_records(bundle, [run / "shards" / "dna"], split="all", limit=40)
    summary = summarise(evaluate_records(bundle, by_mod["dna"], repeats=2), bundle.spec, len(by_mod["dna"]))
    assert set(summary) == {"dna"} and summary["dna"]["fields"].keys() == {"dna/base"}
    assert 0 < summary["dna"]["bits_per_token"] < 8 and "bits_per_dim" not in summary["dna"]


def test_samples_sequences_of_its_alphabet(bundle: Bundle) -> None:
    blank = [Record([Field("sequence", "dna/base", np.full(12, MISSING))]) for _ in range(4)]
    done = fill(bundle, blank, SamplerOptions(steps=8), torch.Generator().manual_seed(0)).records
    seqs = [bundle.adapters["dna"].decode(r) for r in done]
    assert all(len(s) == 12 and set(s) <= set(BASES) for s in seqs)
