"""A full disk (issue 9 §5): every stage ends with exit 3 naming the folder, commits nothing, changes no
input, and the rerun after space is freed equals an uninterrupted run.

The disk is real where this process may mount a tmpfs (root, as in the dev container): --out lies on
an 8 MiB tmpfs filled until half of what the stage writes still fits, so the stage runs out of space
in the middle of its writes, wherever they happen. Elsewhere ENOSPC is raised at a fault point in the
middle of the stage's writes (artifacts/faults.py), the same error through the same handling; the
test's output says which of the two ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import faultkit

pytestmark = pytest.mark.faults

# (stage, its reference artifact in the world, where ENOSPC is injected when no disk can be filled)
STAGES = [
    ("tokenize", "tok", "shard-write:2:ENOSPC"),
    ("cache-ref", "ref", "shard-write:2:ENOSPC"),
    ("train", "train", "checkpoint-save:1:ENOSPC"),
    ("export", "model", "export-save:1:ENOSPC"),
    ("evaluate", "eval", "atomic-replace:2:ENOSPC"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> faultkit.World:
    return faultkit.world(tmp_path_factory)


@pytest.fixture
def disk(tmp_path):
    """(a folder, whether it is a real small file system this test may fill)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    yield mount, mounted
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of ``disk`` but ``leave`` bytes."""
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (stats.f_bavail * stats.f_frsize - leave))
    return filler


@pytest.mark.parametrize("stage, name, point", STAGES, ids=[s for s, _, _ in STAGES])
def test_a_full_disk_fails_cleanly_and_the_rerun_completes(world, disk, monkeypatch, stage, name, point):
    from dpo.artifacts import faults

    folder, real = disk
    reference = getattr(world, name)
    out = folder / "out"
    argv = [*faultkit.stage_args(world, stage), "--out", out]
    inputs = faultkit.digest(world.root)
    if real:
        filler = _fill(folder, _size(reference) // 2)
    else:
        monkeypatch.setenv("DPO_TEST_FAULT", point)
        faults.reset()
    print(f"{stage}: {'a full tmpfs' if real else 'DPO_TEST_FAULT=' + point}")

    result = faultkit.invoke(argv)
    assert result.exit_code == 3, result.output[-3000:]
    assert f"no space left on the device that holds {out}" in result.output, result.output[-3000:]
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception), result.output
    assert not (out / "manifest.json").exists()
    assert faultkit.digest(world.root) == inputs

    if real:
        filler.unlink()
    else:
        monkeypatch.delenv("DPO_TEST_FAULT")
    result = faultkit.invoke(argv)
    assert result.exit_code == 0, result.output[-3000:]
    faultkit.assert_same(stage, out, reference)
    assert faultkit.digest(world.root) == inputs
