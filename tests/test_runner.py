"""The stage runner: take the output, commit last, let go of the lock on every path, and hand rank 0's
decision (or error) to every rank."""

from __future__ import annotations

import errno
import json
import os

import pytest

from dpo.artifacts.errors import ArtifactError, DpoError, LockHeldError, UsageError
from dpo.artifacts.lock import LOCK_NAME, ArtifactLock
from dpo.artifacts.manifest import Manifest
from dpo.artifacts.runner import StageRun, on_main
from dpo.artifacts.shards import ArtifactReader, file_entry

FP = "a" * 16


def commit(out, fp: str = FP) -> None:
    with StageRun("test", out, "eval", fp) as run:
        assert not run.complete and (out / LOCK_NAME).is_file()
        run.commit(Manifest(kind="eval", fingerprint=fp, config={}))
    assert not (out / LOCK_NAME).exists()


def test_fresh_then_complete_then_refused(tmp_path):
    out = tmp_path / "out"
    commit(out)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == FP
    with StageRun("test", out, "eval", FP) as run:
        assert run.complete and run.manifest.fingerprint == FP
    with pytest.raises(ArtifactError, match="--overwrite"):
        with StageRun("test", out, "eval", "b" * 16):
            pass
    assert not (out / LOCK_NAME).exists()


def test_an_error_inside_releases_the_lock_and_commits_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError):
        with StageRun("test", out, "eval", FP):
            raise UsageError("bad input found late")
    assert not (out / LOCK_NAME).exists() and not (out / "manifest.json").exists()
    with StageRun("test", out, "eval", FP) as run:  # the partial run of the same fingerprint resumes
        assert run.resumed


def test_a_held_lock_is_refused_and_inspect_runs_before_the_folder_is_touched(tmp_path):
    out = tmp_path / "out"
    with ArtifactLock(out):
        with pytest.raises(LockHeldError):
            with StageRun("test", out, "eval", FP):
                pass
    seen = []
    with StageRun("test", out, "eval", FP, inspect=lambda d: seen.append(sorted(p.name for p in d.iterdir()))):
        pass
    assert seen == [[LOCK_NAME]]


class Rank:
    """A collective seen from one rank, whose broadcast returns what rank 0 sent."""

    world_size = 2

    def __init__(self, rank: int, from_rank0=None):
        self.rank, self.from_rank0, self.sent = rank, from_rank0, []

    def broadcast(self, obj):
        self.sent.append(obj)
        return obj if self.rank == 0 else self.from_rank0


def test_on_main_hands_rank0s_result_or_error_to_every_rank():
    assert on_main(Rank(1, ("ok", 42)), lambda: pytest.fail("runs on rank 0 only")) == 42
    error = UsageError("locked")
    with pytest.raises(UsageError, match="locked"):
        on_main(Rank(1, ("error", error)), lambda: None)
    with pytest.raises(DpoError, match="rank 0 failed"):
        on_main(Rank(1, ("crash", None)), lambda: None)

    rank0 = Rank(0)
    with pytest.raises(UsageError):
        on_main(rank0, lambda: (_ for _ in ()).throw(UsageError("bad")))
    assert rank0.sent[0][0] == "error"
    crashed = Rank(0)
    with pytest.raises(ZeroDivisionError):
        on_main(crashed, lambda: 1 / 0)
    assert crashed.sent == [("crash", None)]


# ------------------------------------------------------------------------------ nothing of the user's is lost


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_overlapping_an_input_is_refused_before_anything_is_touched(tmp_path, where):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text("{}\n")
    out = {"same": data, "inside": data / "out", "contains": tmp_path}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=f"--out {out} .* the input --data {data}"):
        with StageRun("test", out, "eval", FP, inputs=[("--data", data), ("--other", None)]):
            pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_out_that_is_or_lies_under_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for out, message in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "notes.txt" / "x", "lies under the file")):
        with pytest.raises(UsageError, match=message):
            with StageRun("test", out, "eval", FP):
                pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_that_cannot_be_a_folder_is_a_usage_error(tmp_path):
    """A dangling symbolic link (a purged scratch folder), a name too long for the file system: exit 2
    naming --out, not a FileExistsError or OSError traceback."""
    (tmp_path / "scratch").symlink_to(tmp_path / "purged" / "run")
    for out, message in ((tmp_path / "scratch", "is a symbolic link to .*purged/run, which does not exist"),
                         (tmp_path / "scratch" / "tok", "lies under .*scratch, a symbolic link to .*purged/run"),
                         (tmp_path / ("x" * 300), "cannot create it \\(File name too long")):
        with pytest.raises(UsageError, match=message) as error:
            with StageRun("test", out, "eval", FP):
                pass
        assert error.value.exit_code == 2
    assert not (tmp_path / "purged").exists()


def test_overwrite_refuses_a_folder_with_foreign_files_naming_one(tmp_path):
    out = tmp_path / "out"
    commit(out)
    (out / "my-notes.md").write_text("mine")
    with pytest.raises(ArtifactError, match=f"not part of the eval artifact it holds, e.g. {out / 'my-notes.md'}"):
        with StageRun("test", out, "eval", "b" * 16, overwrite=True):
            pass
    assert (out / "my-notes.md").read_text() == "mine" and json.loads((out / "manifest.json").read_text())["fingerprint"] == FP


def test_overwrite_keeps_the_old_artifact_readable_until_the_new_one_commits(tmp_path):
    out = tmp_path / "out"
    with StageRun("test", out, "eval", FP, owns=("result.txt",)) as run:
        (run.dir / "result.txt").write_text("old")
        run.commit(Manifest(kind="eval", fingerprint=FP, config={}, files=[file_entry(run.dir, "result.txt")]))
    with pytest.raises(UsageError):
        with StageRun("test", out, "eval", "b" * 16, overwrite=True, owns=("result.txt",)) as run:
            assert run.dir == out / ".dpo-next"
            (run.dir / "result.txt").write_text("half")
            raise UsageError("bad input found late")
    assert ArtifactReader(out).fingerprint == FP and (out / "result.txt").read_text() == "old"
    with StageRun("test", out, "eval", "b" * 16, overwrite=True, owns=("result.txt",)) as run:
        assert ArtifactReader(out).fingerprint == FP  # still the old one while the new one is written
        (run.dir / "result.txt").write_text("new")
        run.commit(Manifest(kind="eval", fingerprint="b" * 16, config={}, files=[file_entry(run.dir, "result.txt")]))
    assert ArtifactReader(out).fingerprint == "b" * 16 and (out / "result.txt").read_text() == "new"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "result.txt"]


SWAP = """
import sys
from pathlib import Path
from dpo.artifacts.manifest import Manifest
from dpo.artifacts.runner import StageRun
from dpo.artifacts.shards import file_entry

out, fp, text = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with StageRun("test", out, "eval", fp, overwrite=True, owns=("result.txt", "old-only.txt")) as run:
    (run.dir / "result.txt").write_text(text)
    files = [file_entry(run.dir, "result.txt")]
    if text == "old":
        (run.dir / "old-only.txt").write_text("old")
        files.append(file_entry(run.dir, "old-only.txt"))
    run.commit(Manifest(kind="eval", fingerprint=fp, config={}, files=files))
"""


@pytest.mark.parametrize("point", ["replace-artifact:1", "atomic-replace:4"])
def test_a_crash_inside_the_swap_is_finished_by_the_next_run(tmp_path, point):
    import signal
    import subprocess
    import sys

    from conftest import dpo_env

    out = tmp_path / "out"
    script = tmp_path / "swap.py"
    script.write_text(SWAP)
    subprocess.run([sys.executable, script, out, FP, "old"], check=True, env=dpo_env())
    killed = subprocess.run([sys.executable, script, out, "b" * 16, "new"], env=dpo_env(DPO_TEST_FAULT=point))
    assert killed.returncode == -signal.SIGKILL
    with StageRun("test", out, "eval", "b" * 16, owns=("result.txt", "old-only.txt")) as run:
        assert run.complete  # the next run on the folder finished the swap
    assert (out / "result.txt").read_text() == "new" and not (out / "old-only.txt").exists()
    assert not (out / ".dpo-next").exists() and ArtifactReader(out).fingerprint == "b" * 16


@pytest.mark.parametrize("code, expected, exit_code", [
    (errno.ENOSPC, "no space left on the device that holds", 3),
    (errno.EROFS, "Read-only file system; dpo needs to write it", 2),
])
def test_environment_errors_become_errors_a_user_can_act_on(tmp_path, code, expected, exit_code):
    out = tmp_path / "out"
    with pytest.raises(DpoError, match=expected) as info:
        with StageRun("test", out, "eval", FP):
            raise OSError(code, os.strerror(code), str(out / "part.parquet"))
    assert info.value.exit_code == exit_code and not (out / LOCK_NAME).exists()
