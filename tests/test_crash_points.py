"""Crash points (issue 9): SIGKILL a stage at a seeded moment, rerun it, and get what an uninterrupted run gets.

Every point is a ``DPO_TEST_FAULT`` point (artifacts/faults.py) reached while tokenize, cache-ref,
train and export run: inside a shard write, a manifest or marker replace, a checkpoint save, a
metrics row, the export's weights, the safe points where a stage looks for stop signals, and inside
the --overwrite swap. Which time the point is reached (N) is drawn from the number of times an
uninterrupted run reaches it, with a seeded generator: ``DPO_CRASH_SEED`` (printed with every case)
changes the draw, the same seed repeats it.

The killed run and the rerun are forked children of the test process (the imports are paid once);
the rerun must exit 0 and match the uninterrupted run: the listed sha256 of every shard and the
manifest's fingerprint (tokenize, cache-ref), the per-step losses and final weights (train), the
weights and configs (export); and it must leave no marker, staging folder, temporary file or lock.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import faultkit

SEED = int(os.environ.get("DPO_CRASH_SEED", "9"))
pytestmark = [pytest.mark.faults, pytest.mark.slow]

# (stage, what --out holds before the run, fault point, how many draws of N)
POINTS = [
    ("tokenize", "nothing", "shard-write", 2),
    ("tokenize", "nothing", "atomic-replace", 2),
    ("tokenize", "nothing", "stop-check", 1),
    ("tokenize", "another fingerprint", "shard-write", 1),
    ("tokenize", "another fingerprint", "replace-artifact", 1),
    ("tokenize", "another fingerprint", "atomic-replace", 1),
    ("cache-ref", "nothing", "shard-write", 2),
    ("cache-ref", "nothing", "atomic-replace", 1),
    ("cache-ref", "nothing", "stop-check", 1),
    ("train", "nothing", "checkpoint-save", 1),
    ("train", "nothing", "metrics-write", 2),
    ("train", "nothing", "stop-check", 1),
    ("train", "nothing", "atomic-replace", 1),
    ("train", "another fingerprint", "replace-artifact", 1),
    ("export", "nothing", "export-save", 1),
    ("export", "nothing", "atomic-replace", 1),
    ("export", "another fingerprint", "replace-artifact", 1),
]
# What makes the old artifact in --out another fingerprint's, per stage.
OTHER = {"tokenize": ["--seed", "6"], "train": ["--learning-rate", "2e-3"], "export": ["--checkpoint", "step-2"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> faultkit.World:
    return faultkit.world(tmp_path_factory)


def command(world: faultkit.World, stage: str, out: Path, *extra: str, prior: str = "nothing") -> list:
    overwrite = ["--overwrite"] if prior != "nothing" else []
    return [*faultkit.stage_args(world, stage), *extra, *overwrite, "--out", out]


@pytest.fixture(scope="module")
def references(world, tmp_path_factory) -> dict:
    """Per (stage, prior state): the uninterrupted run's output, and how often it reached each point."""
    root = tmp_path_factory.mktemp("uninterrupted")
    found = {}
    for stage, prior in sorted({(s, p) for s, p, _, _ in POINTS}):
        case = root / f"{stage}-{prior.replace(' ', '-')}"
        out = prepare(world, stage, prior, case)
        code, err = faultkit.forked(command(world, stage, out, prior=prior), hits_to=case / "hits.json",
                                    DPO_TEST_FAULT="none:0")
        assert code == 0, err
        found[stage, prior] = (out, json.loads((case / "hits.json").read_text()))
    return found


def prepare(world: faultkit.World, stage: str, prior: str, case: Path) -> Path:
    """The --out of a case, holding a complete artifact of another fingerprint when asked."""
    case.mkdir(parents=True)
    out = case / "out"
    if prior == "another fingerprint":
        code, err = faultkit.forked(command(world, stage, out, *OTHER[stage]))
        assert code == 0, err
    return out


def draws() -> list[tuple[str, str, str, int]]:
    """(stage, prior, point, k): the k-th draw of N for that point."""
    return [(stage, prior, point, k) for stage, prior, point, n in POINTS for k in range(n)]


def pick(stage: str, prior: str, point: str, k: int, reached: int) -> int:
    """The seeded N of the k-th draw (distinct draws for one point, while there are enough moments)."""
    rng = random.Random(f"{SEED}/{stage}/{prior}/{point}")
    order = rng.sample(range(1, reached + 1), reached)
    return order[k % reached]


@pytest.mark.parametrize("stage, prior, point, k", draws(),
                         ids=[f"{s}-{p.split()[0]}-{pt}-{k}" for s, p, pt, k in draws()])
def test_crash_and_rerun_equals_uninterrupted(world, references, tmp_path, stage, prior, point, k):
    reference, reached = references[stage, prior]
    assert reached.get(point), f"an uninterrupted {stage} never reaches {point}: {reached}"
    n = pick(stage, prior, point, k, reached[point])
    where = f"DPO_TEST_FAULT={point}:{n} (of {reached[point]}; DPO_CRASH_SEED={SEED})"
    out = prepare(world, stage, prior, tmp_path / "case")
    old = faultkit.fingerprint(out) if prior != "nothing" else None

    code, err = faultkit.forked(command(world, stage, out, prior=prior), DPO_TEST_FAULT=f"{point}:{n}")
    assert code == -9, f"{where}: the run was not killed (exit {code}): {err[-2000:]}"
    if (out / "manifest.json").is_file():
        # Killed before the commit: the old artifact, whole; after it: the new one (a swap is finished by the rerun).
        assert faultkit.fingerprint(out) in (old, faultkit.fingerprint(reference)), where
    code, err = faultkit.forked(command(world, stage, out, prior=prior))
    assert code == 0, f"{where}: the rerun failed (exit {code}): {err[-3000:]}"
    faultkit.assert_same(stage, out, reference)


def test_enough_crash_points():
    assert len(draws()) >= 20
    assert {"shard-write", "checkpoint-save", "atomic-replace", "replace-artifact"} <= {p for _, _, p, _ in POINTS}
