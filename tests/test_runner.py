"""The stage runner: take the output, commit last, let go of the lock on every path, and hand rank 0's
decision (or error) to every rank."""

from __future__ import annotations

import json

import pytest

from dpo.artifacts.errors import ArtifactError, DpoError, LockHeldError, UsageError
from dpo.artifacts.lock import LOCK_NAME, ArtifactLock
from dpo.artifacts.manifest import Manifest
from dpo.artifacts.runner import StageRun, on_main

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
    with StageRun("test", out, "eval", FP, inspect=lambda: seen.append(sorted(p.name for p in out.iterdir()))):
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
