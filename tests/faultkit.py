"""What the fault tests share: one small pipeline built in-process (every artifact kind), the CLI run
in-process or in a forked child, and file digests to prove that nothing a stage read was changed.

The pipeline is built once per test process (pytest-xdist worker) and only read afterwards: a test
that damages an input damages its own copy (``copy_world``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from conftest import HH_DATA, build_tiny_llama

WIDE = {"COLUMNS": "400", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
TOKENIZE = ("--max-seq-length", "96", "--max-prompt-length", "48", "--eval-fraction", "0.25", "--rows-per-shard", "12", "--seed", "5")
TRAIN = ("--max-steps", "4", "--save-every", "2", "--per-device-batch-size", "4", "--logging-steps", "1",
         "--learning-rate", "1e-3", "--warmup-ratio", "0")


@dataclass(frozen=True)
class World:
    root: Path
    llama: Path  # a tiny random Llama with the demo tokenizer
    data: Path  # 48 HH-RLHF pairs, jsonl
    tok: Path  # tokenized: train 3 shards, eval 1
    ref: Path  # ref-logps of both splits
    train: Path  # 4 steps, a checkpoint at step 2, final/
    model: Path  # export of train
    eval: Path  # evaluate of model on the eval split

    def paths(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in ("root", "llama", "data", "tok", "ref", "train", "model",
                                                             "eval")}


def invoke(argv: list[str]):
    """``dpo ARGV`` in this process, as the console script runs it (stderr kept apart)."""
    from dpo.cli import app

    return CliRunner().invoke(app, [str(a) for a in argv], env=WIDE)


def dpo(*argv) -> None:
    result = invoke(list(argv))
    if result.exit_code != 0:
        raise AssertionError(f"dpo {' '.join(map(str, argv))} exited {result.exit_code}:\n{result.output}")


def stage_args(world: World | dict, stage: str) -> list[str]:
    """The usual command line of a stage on ``world``'s artifacts (without --out)."""
    w = world if isinstance(world, dict) else world.paths()
    return {
        "tokenize": ["tokenize", "--data", w["data"], "--tokenizer", w["llama"], *TOKENIZE, "-q"],
        "cache-ref": ["cache-ref", "--tokenized", w["tok"], "--model", w["llama"], "--rows-per-shard", "16", "-q"],
        "train": ["train", "--tokenized", w["tok"], "--ref-cache", w["ref"], "--model", w["llama"], *TRAIN, "-q"],
        "export": ["export", "--train", w["train"], "-q"],
        "evaluate": ["evaluate", "--model", w["model"], "--tokenized", w["tok"], "--ref-cache", w["ref"], "-q"],
    }[stage]


_WORLD: World | None = None


def world(factory) -> World:
    """The pipeline, built on first use in this process (``factory``: pytest's tmp_path_factory)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = build_world(factory.mktemp("fault-world"))
    return _WORLD


def build_world(root: Path) -> World:
    llama = build_tiny_llama(root / "llama")
    data = root / "data.jsonl"
    with gzip.open(HH_DATA, "rt", encoding="utf-8") as f:
        data.write_text("".join(next(f) for _ in range(48)), encoding="utf-8")
    w = World(root, llama, data, root / "tok", root / "ref", root / "train", root / "model", root / "eval")
    dpo(*stage_args(w, "tokenize"), "--out", w.tok)
    dpo(*stage_args(w, "cache-ref"), "--out", w.ref)
    dpo(*stage_args(w, "train"), "--out", w.train)
    dpo(*stage_args(w, "export"), "--out", w.model)
    dpo(*stage_args(w, "evaluate"), "--out", w.eval)
    return w


def copy_world(w: World, into: Path) -> World:
    """A copy of the pipeline's folders under ``into`` that a test may damage (the model too)."""
    into.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, path in w.paths().items():
        if name == "root":
            continue
        target = into / Path(path).name
        (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, target)
        paths[name] = target
    return World(into, **paths)


def digest(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (lock files aside), except under ``skip``."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip) or path.name.startswith(".dpo.lock"):
            continue
        if path.is_file() and not path.is_symlink():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def listed_sha256(artifact: Path) -> dict[str, str]:
    """The files an artifact's manifest lists, with their sha256 as listed."""
    return {f["path"]: f["sha256"] for f in json.loads((artifact / "manifest.json").read_text())["files"]}


def fingerprint(artifact: Path) -> str:
    return json.loads((artifact / "manifest.json").read_text())["fingerprint"]


def losses(train: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def leftovers(artifact: Path) -> list[str]:
    """What a finished stage must not leave in its output: markers, staging, temporary files, a lock."""
    return sorted(p.relative_to(artifact).as_posix() for p in artifact.rglob("*")
                  if p.name in (".dpo-partial.json", ".dpo-next", ".rejects") or p.name.endswith((".tmp", ".partial"))
                  or p.name.startswith(".dpo.lock"))


def assert_same(stage: str, got: Path, want: Path) -> None:
    """``got``, made by a run that crashed or failed and was rerun, is what an uninterrupted run made (``want``)."""
    assert fingerprint(got) == fingerprint(want)
    assert not leftovers(got), leftovers(got)
    if stage in ("tokenize", "cache-ref"):
        assert listed_sha256(got) == listed_sha256(want)
    elif stage == "train":
        from safetensors.torch import load_file

        a, b = losses(got), losses(want)
        assert [s for s, _ in a] == [s for s, _ in b]
        np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=0, atol=1e-6)
        wa, wb = load_file(got / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
        assert wa.keys() == wb.keys()
        for name in wa:
            np.testing.assert_allclose(wa[name].numpy(), wb[name].numpy(), rtol=0, atol=1e-6)
        assert sorted(p.name for p in (got / "checkpoints").iterdir()) == sorted(
            p.name for p in (want / "checkpoints").iterdir())
    elif stage == "evaluate":  # metrics.json holds the seconds it took; the per-pair values must match
        assert listed_sha256(got)["pairs.parquet"] == listed_sha256(want)["pairs.parquet"]
    else:  # export: the card names its own folder; everything else is the same bytes
        got_files, want_files = listed_sha256(got), listed_sha256(want)
        got_files.pop("README.md"), want_files.pop("README.md")
        assert got_files == want_files


def forked(argv: list, hits_to: Path | None = None, **env: str) -> tuple[int, str]:
    """``dpo ARGV`` in a forked child of this process (no imports to repeat: a fraction of a second
    where a fresh interpreter takes seconds) with ``env`` added; its exit status as
    ``os.waitstatus_to_exitcode`` gives it (-9: SIGKILLed) and what it wrote to stderr. ``hits_to``:
    where the child writes how often it reached each fault point (with ``DPO_TEST_FAULT`` set)."""
    with tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                from dpo.artifacts import faults

                os.environ.update(env)
                faults.reset()
                result = invoke(list(argv))
                err.write(result.output)
                err.flush()
                code = result.exit_code
                if hits_to is not None:
                    Path(hits_to).write_text(json.dumps(faults.hits()))
            except BaseException as exc:  # noqa: BLE001 - reported through the exit code and stderr
                err.write(f"child failed: {exc!r}")
                err.flush()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read()
