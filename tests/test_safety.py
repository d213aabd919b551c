"""Training runs that cannot be subverted or clobbered: safe checkpoints, integrity, locks, numerical guards, signals."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_support import TRAIN, ROOT, env, metrics, run_train, tiny_args, tiny_shard_root

from maskdiff.training.checkpoints import COMPLETE, seal

pytestmark = pytest.mark.slow
RUN = ["train.steps=8", "train.log_every=2", "train.eval_every=8", "train.checkpoint_every=2", "train.plots=false"]


class Planted:
    """A pickle whose loading would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_shard_root(tmp_path_factory)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """A run stopped after step 4 of 8, with complete checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    run_train(tiny_args(shards, run, *RUN, "--until", "4"))
    return run


@pytest.fixture()
def copy(stopped: Path, tmp_path: Path) -> Path:
    """A private copy of the stopped run (its config names the copy's directory on resume)."""
    dst = tmp_path / "run"
    shutil.copytree(stopped, dst)
    return dst


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def refused(res: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with exactly one ``error:`` line (containing ``words``) and no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


# --- no code execution -------------------------------------------------------------------------


def test_planted_pickles_never_run(copy: Path, tmp_path: Path) -> None:
    """Every file of every checkpoint replaced by a code-running pickle, checksums made to match: refused, nothing ran."""
    marker = tmp_path / "PWNED"
    ckpts = copy / "checkpoints"
    for tag in ("step00000002", "step00000004"):
        for f in (ckpts / tag).iterdir():
            if f.name != COMPLETE:
                if f.name.startswith("mp_rank"):
                    torch.save({"module": Planted(marker)}, f)  # torch's own zip format
                else:
                    f.write_bytes(pickle.dumps(Planted(marker)))  # a bare pickle
        seal(ckpts / tag, int(tag[4:]))
    before = snapshot(copy)
    res = run_train(["--resume", str(copy)], check=False)
    line = refused(res, "refused to load", "step00000004")
    assert not marker.exists(), line
    assert snapshot(copy) == before


def test_tampered_checkpoint_fails_its_checksum_before_unpickling(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for tag in ("step00000002", "step00000004"):
        torch.save({"module": Planted(marker)}, copy / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    res = run_train(["--resume", str(copy)], check=False)
    refused(res, "no complete checkpoint", "does not match its checksum")
    assert not marker.exists()


# --- integrity and fallback --------------------------------------------------------------------


def test_damaged_latest_falls_back_to_the_previous_complete_checkpoint(copy: Path) -> None:
    states = copy / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    res = run_train(["--resume", str(copy)])
    assert "does not match its checksum" in res.stderr and "previous complete checkpoint step00000002" in res.stderr
    assert "steps 2 -> 8" in res.stderr
    assert [m["step"] for m in metrics(copy, "train")] == [2, 4, 6, 8]
    assert (copy / "bundle" / "bundle.json").is_file()


def test_half_written_latest_falls_back(copy: Path) -> None:
    (copy / "checkpoints" / "step00000004" / COMPLETE).unlink()  # killed before the save finished
    res = run_train(["--resume", str(copy), "--until", "6"])
    assert "step00000004 is incomplete" in res.stderr and "steps 2 -> 6" in res.stderr


def test_latest_naming_a_missing_tag(copy: Path) -> None:
    ckpts = copy / "checkpoints"
    (ckpts / "latest").write_text("step00000099\n")
    res = run_train(["--resume", str(ckpts.parent), "--until", "6"])
    assert "step00000099 does not exist" in res.stderr and "steps 4 -> 6" in res.stderr
    for tag in ("step00000002", "step00000004", "step00000006"):
        shutil.rmtree(ckpts / tag, ignore_errors=True)
    (ckpts / "latest").write_text("step00000004\n")
    refused(run_train(["--resume", str(copy)], check=False), "no complete checkpoint", "step00000004 does not exist")


# --- runs that cannot clobber each other ------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(copy: Path) -> None:
    with open(copy / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{os.getpid()}\n")
        f.flush()
        before = snapshot(copy)
        for args in (["--resume", str(copy)], tiny_args(copy.parent, copy, *RUN, "--overwrite")):
            refused(run_train(args, check=False), "in use by process", str(os.getpid()))
        assert snapshot(copy) == before


def test_resume_of_a_finished_run_changes_nothing(copy: Path) -> None:
    run_train(["--resume", str(copy)])
    before = snapshot(copy)
    refused(run_train(["--resume", str(copy)], check=False), "already finished at step 8")
    assert snapshot(copy) == before


def test_step_targets_below_the_checkpoint_are_refused(copy: Path) -> None:
    before = snapshot(copy)
    refused(run_train(["--resume", str(copy), "train.steps=3"], check=False), "train.steps=3 is below the checkpoint's step 4")
    refused(run_train(["--resume", str(copy), "--until", "4"], check=False), "--until 4", "already at step 4")
    assert snapshot(copy) == before


def test_a_failed_start_leaves_nothing_behind(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "fresh"
    res = run_train(tiny_args(shards, run, *RUN, "train.condition_fields=[nope]"), check=False)
    refused(res, "train.condition_fields")
    assert not run.exists()
    run_train(tiny_args(shards, run, *RUN, "--until", "2"))  # the retry is not blocked


def test_run_directory_under_a_file(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    refused(run_train(tiny_args(shards, tmp_path / "file" / "run", *RUN), check=False), "run directory")


# --- numerical guards --------------------------------------------------------------------------


def test_a_diverging_run_stops_and_exports_nothing(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "nan"
    res = run_train(tiny_args(shards, run, "train.steps=40", "train.log_every=1", "train.checkpoint_every=40", "optim.lr=1e9",
                              "optim.warmup_steps=0"), check=False)
    refused(res, "not finite")
    assert not (run / "bundle").exists()
    train = metrics(run, "train")
    assert sum(m["skipped_steps"] for m in train) >= 1
    assert all(m["loss"] is None or m["loss"] == m["loss"] for m in train)  # no NaN written


def test_non_finite_gradients_skip_the_step() -> None:
    from maskdiff.training.optimizer import GuardedAdamW

    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.skipped == 1 and not opt.state
    p.grad = torch.ones(3)
    opt.skip_next = True  # the trainer saw a non-finite loss
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.skipped == 2
    opt.skip_next = False
    opt.step()
    assert bool((p.detach() < 1).all())


# --- signals -----------------------------------------------------------------------------------


def test_sigterm_exits_130_with_a_message(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "term"
    cmd = TRAIN + tiny_args(shards, run, "train.steps=100000", "train.log_every=1", "train.checkpoint_every=100000") + ["--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, "".join(seen) + (rest or "")
    assert f"interrupted; continue from the latest checkpoint with --resume {run}" in (rest or "")


def test_metrics_line_that_is_not_json_is_one_line(copy: Path) -> None:
    with open(copy / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    refused(run_train(["--resume", str(copy)], check=False), "metrics.jsonl")


def test_summary_has_no_nan(copy: Path) -> None:
    run_train(["--resume", str(copy)])
    json.loads((copy / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))


def test_plots_skip_non_finite_points(tmp_path: Path) -> None:
    from maskdiff.training.plots import plot_metrics

    lines = [{"kind": "train", "step": 1, "bits_per_token": {"text": 5.0, "pixels": float("nan")}},
             {"kind": "train", "step": 2, "bits_per_token": {"text": float("inf"), "pixels": float("nan")}},
             {"kind": "eval", "step": 2, "bits_per_token": {"text": 4.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in out] == ["text.png"]


def test_reading_a_checkpoint_without_a_gpu_does_not_warn_about_a_missing_one(tmp_path: Path) -> None:
    """A table fit's scorer reads checkpoints in a process that never trains: DeepSpeed, imported there
    first, used to print '[WARNING] Setting accelerator to CPU ...' into every fit's output."""
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    code = (f"from maskdiff.training.checkpoints import safe_load; print(safe_load({str(tmp_path / 'state.pt')!r})['w'].tolist()); "
            "import deepspeed.ops.op_builder")  # what unpickling DeepSpeed's own checkpoint files imports
    if torch.cuda.is_available():
        pytest.skip("a GPU is there: DeepSpeed finds it")
    child_env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[0.0, 0.0]", done.stderr
    assert "unable to detect" not in done.stderr and "Setting accelerator" not in done.stderr
