"""Several tables and FASTA sources in one run: supports named per data set, shared ones shared, old names still read.

One short training run (tiny model, a few steps) over two tables that share a
column name with different categories (adult and penguins both have ``sex``)
and a table sharded before data sets had names, plus two FASTA sources with
different header fields; then the vocabulary, imputation and generation of its
bundle, and a bundle written in the old layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from adapter_fixtures import ADULT, PENGUINS, PENGUINS_RAW, PRJEB85, UNIPROT, first_fasta_records
from tasks_fixtures import run_tool, tiny_bundle
from training_support import run_train

from maskdiff.bundle import BundleError, load_bundle
from maskdiff.cli import UserError
from maskdiff.files import sha256_file
from maskdiff.tasks.imputation import impute
from maskdiff.data.shards import MANIFEST, ShardSet, write_shards
from maskdiff.data.tables import Table
from maskdiff.core.tokens import VocabMismatchError

ADULT_SEX, PENGUIN_SEX = {"Female", "Male"}, {"female", "male"}


def head_csv(src: Path, rows: int, dest: Path) -> Path:
    dest.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[: rows + 1]), encoding="utf-8")
    return dest


def strip_dataset_option(state: dict) -> dict:
    """An adapter state as written before data sets had names (no ``dataset`` option)."""
    state["options"].pop("dataset", None)
    return state


def old_style_shards(inputs: list[Path], out: Path, **options) -> Path:
    """Shards as written before data sets had names: supports ``tabular/col:<column>``, no ``dataset`` option."""
    write_shards("tabular", inputs, out, progress=False, **options)
    m = json.loads((out / MANIFEST).read_text())
    strip_dataset_option(m["adapter"]["state"])
    (out / MANIFEST).write_text(json.dumps(m, indent=1))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many-tables")
    shards = root / "shards"
    old_style_shards([PENGUINS_RAW], shards / "raw-penguins", passthrough="Comments")
    config = root / "tables.yaml"
    config.write_text(f"""
name: many
seed: 0
data:
  shard_root: {shards}
  sources:
    tabular: {{dirs: [adult, penguins, raw-penguins], weight: 1.0}}
    protein: {{dirs: [uniprot, genes], weight: 1.0}}
  build:
    adult: {{modality: tabular, inputs: [{head_csv(ADULT, 300, root / 'adult.csv')}], options: {{bins: 8}}}}
    penguins: {{modality: tabular, inputs: [{PENGUINS}], options: {{bins: 8}}}}
    uniprot: {{modality: protein, inputs: [{first_fasta_records(UNIPROT, 40, root / 'u.fasta')}], options: {{max_len: 32, condition: PE}}}}
    genes: {{modality: protein, inputs: [{first_fasta_records(PRJEB85, 40, root / 'g.faa')}], options: {{max_len: 32, condition: "start_type,partial"}}}}
  batch_tokens: 512
  heldout: 0.1
model: {{dim: 16, depth: 1, heads: 2}}
schedules:
  tabular: {{kind: linear}}
  protein: {{kind: linear}}
optim: {{lr: 3.0e-3, warmup_steps: 1}}
deepspeed: {{zero_stage: 0}}
train: {{steps: 4, log_every: 2, eval_every: 4, eval_batches: 1, checkpoint_every: 4, plots: false,
         condition_dropout: 0.1, condition_fields: [protein/PE, protein/start_type]}}
""")
    run_train(["--config", str(config), f"run_dir={root / 'run'}"])
    return root


def test_two_tables_with_a_shared_column_train_together_each_under_its_name(run: Path) -> None:
    bundle = load_bundle(run / "run" / "bundle")
    spec = bundle.spec
    assert "tabular/col:sex" not in spec.index
    for dataset, sex in (("adult", ADULT_SEX), ("penguins", PENGUIN_SEX)):
        adapter = bundle.adapter("tabular", dataset)
        assert adapter.key == f"tabular/{dataset}" and set(adapter.columns["sex"].categories) == sex
        assert spec.support(f"tabular/{dataset}/col:sex").size == len(sex) + 1  # + the other bucket
    adult, penguins = bundle.adapter("tabular", "adult"), bundle.adapter("tabular", "penguins")
    assert set(adult.columns) != set(penguins.columns)
    assert {s.name for s in spec.supports if s.modality == "tabular"} == {
        a.column_support(c) for a in (adult, penguins, bundle.adapter("tabular", "tabular")) for c in a.columns}
    # the old-style table kept its old names and trained beside them
    assert "tabular/col:Sex" in spec.index and bundle.adapter("tabular", "tabular").key == "tabular"
    assert sorted(bundle.info["sources"]) == ["protein/genes", "protein/uniprot", "tabular", "tabular/adult", "tabular/penguins"]
    # the training shards still decode through their own adapters
    both = ShardSet([run / "shards" / "adult", run / "shards" / "penguins"])
    decoded = [(rec.meta["source"], both.decode(rec)) for rec in both]
    assert {source for source, _ in decoded} == {"tabular/adult", "tabular/penguins"}
    assert all(raw["sex"] in (ADULT_SEX if source == "tabular/adult" else PENGUIN_SEX) for source, raw in decoded if raw["sex"] is not None)


def test_each_table_is_imputed_with_its_own_categories(run: Path) -> None:
    bundle = load_bundle(run / "run" / "bundle")
    adult = bundle.adapter("tabular", "adult")
    adult_row = Table(list(adult.columns), [[None] * len(adult.columns)] * 3, "frame")
    penguin_row = Table(["species", "island", "sex"], [["Adelie", "Torgersen", None], ["Gentoo", None, None]], "frame")
    filled = impute(bundle, adult_row).draws[0]  # chosen by its columns
    assert {filled[(r, adult_row.columns.index("sex"))] for r in range(3)} <= ADULT_SEX
    assert {v for (r, c), v in filled.items() if adult_row.columns[c] == "education"} <= set(adult.columns["education"].categories)
    for dataset in (None, "penguins"):
        filled = impute(bundle, penguin_row, dataset=dataset).draws[0]
        assert {filled[(0, 2)], filled[(1, 2)]} <= PENGUIN_SEX and filled[(1, 1)] in {"Biscoe", "Dream", "Torgersen"}
    raw = bundle.adapter("tabular", "tabular")
    filled = impute(bundle, Table(["Species", "Sex"], [[None, None]], "frame")).draws[0]  # the old-style table
    assert filled[(0, 1)] in raw.columns["Sex"].categories and filled[(0, 0)] in raw.columns["Species"].categories
    with pytest.raises(UserError, match="several tables .* name one with --dataset"):
        impute(bundle, Table(["sex"], [[None]], "frame"))  # both named tables have it: ambiguous
    with pytest.raises(BundleError, match="no tabular data set 'nope'"):
        impute(bundle, penguin_row, dataset="nope")


def test_impute_command_fills_the_table_it_is_given(run: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "penguins.csv"
    src.write_text("species,island,sex\nAdelie,Torgersen,\nGentoo,,\n", encoding="utf-8")
    out = tmp_path / "filled.csv"
    code, _, err = run_tool(capsys, "impute", "--model", run / "run" / "bundle", "--input", src, "--output", out, "--no-progress")
    assert code == 0, err
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert {r[2] for r in rows} <= PENGUIN_SEX and rows[1][1] in {"Biscoe", "Dream", "Torgersen"}
    code, _, err = run_tool(capsys, "impute", "--model", run / "run" / "bundle", "--dataset", "adult", "--input", src, "--output", out,
                            "--overwrite", "--no-progress")
    assert code == 2 and "not columns the model knows" in err  # penguin columns are not adult's


def test_two_fasta_sources_with_different_header_fields_share_the_residues(run: Path, tmp_path: Path, capsys) -> None:
    bundle = load_bundle(run / "run" / "bundle")
    spec = bundle.spec
    uniprot, genes = bundle.adapter("protein", "uniprot"), bundle.adapter("protein", "genes")
    assert list(uniprot.vocabs) == ["PE"] and list(genes.vocabs) == ["start_type", "partial"]
    protein = [s.name for s in spec.supports if s.modality == "protein"]
    assert sorted(protein) == ["protein/genes/partial", "protein/genes/start_type", "protein/residue", "protein/uniprot/PE"]
    with pytest.raises(BundleError, match="several protein data sets"):
        bundle.adapter("protein")
    start = genes.vocabs["start_type"].categories[0]
    out = tmp_path / "genes.fasta"
    code, _, err = run_tool(capsys, "protein", "--model", run / "run" / "bundle", "--dataset", "genes", "--condition", f"start_type={start}",
                            "--num", 3, "--length", 12, "--steps", 4, "--output", out, "--no-progress")
    assert code == 0, err
    headers = [line for line in out.read_text().splitlines() if line.startswith(">")]
    assert len(headers) == 3 and all(f"start_type={start}" in h and "PE=" not in h for h in headers)


def test_a_second_table_under_the_same_default_name_is_refused_with_the_fix(tmp_path: Path) -> None:
    write_shards("tabular", [PENGUINS], tmp_path / "a", progress=False)
    write_shards("tabular", [head_csv(ADULT, 50, tmp_path / "adult.csv")], tmp_path / "b", progress=False)
    with pytest.raises(VocabMismatchError, match="--state-from .* or with its own --name"):
        ShardSet([tmp_path / "a", tmp_path / "b"])
    write_shards("tabular", [head_csv(ADULT, 50, tmp_path / "adult.csv")], tmp_path / "c", name="adult", progress=False)
    both = ShardSet([tmp_path / "a", tmp_path / "c"])
    assert {"tabular/col:sex", "tabular/adult/col:sex"} <= set(both.spec.index) and set(both.adapters) == {"tabular", "tabular/adult"}


def test_a_bundle_written_before_data_set_names_still_loads_and_imputes(tmp_path: Path, capsys) -> None:
    old = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(), old)
    info = json.loads((old / "bundle.json").read_text())
    info.pop("sources")
    for state_file in (old / "adapters").glob("*/state.json"):
        state_file.write_text(json.dumps(strip_dataset_option(json.loads(state_file.read_text())), indent=1) + "\n")
        info["files"][str(state_file.relative_to(old))] = sha256_file(state_file)
    (old / "bundle.json").write_text(json.dumps(info, indent=1) + "\n")
    bundle = load_bundle(old)
    assert set(bundle.adapters) == set(bundle.modalities) and "tabular/col:sex" in bundle.spec.index
    filled = impute(bundle, Table(["species", "sex"], [["Adelie", None]], "frame")).draws[0]
    assert filled[(0, 1)] in PENGUIN_SEX
    out = tmp_path / "p.fasta"
    pe = bundle.adapter("protein").vocabs["PE"].categories[0]
    code, _, err = run_tool(capsys, "protein", "--model", old, "--condition", f"PE={pe}", "--num", 2, "--length", 8, "--steps", 4, "--output", out,
                            "--no-progress")
    assert code == 0, err
    assert all(f"PE={pe}" in line for line in out.read_text().splitlines() if line.startswith(">"))
