"""The artifact layer: manifests, sharded Parquet, the reader's checks, fingerprints, the lock and
the life of an output directory (fresh / resume / complete / refused)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from dpo.artifacts.fingerprint import canonical, fingerprint, hash_json, semantic_config, sha256_file
from dpo.artifacts.lock import LOCK_NAME, ArtifactLock
from dpo.artifacts.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    FileEntry,
    InputRef,
    Manifest,
    read_manifest,
    resolve_inside,
    write_manifest,
)
from dpo.artifacts.output import PARTIAL, OutputState, commit_output, prepare_output
from dpo.artifacts.shards import (
    ArtifactReader,
    committed_shard,
    file_entry,
    shard_bounds,
    shard_path,
    write_shard,
)
from dpo.artifacts.errors import ArtifactError, LockHeldError


def table(start: int, stop: int) -> pa.Table:
    ids = list(range(start, stop))
    return pa.table({
        "index": pa.array(ids, pa.int64()),
        "input_ids": pa.array([[i, i + 1, i + 2] for i in ids], pa.list_(pa.int32())),
    })


def build_artifact(root: Path, rows: int = 10, rows_per_shard: int = 4, fp: str = "f" * 16) -> Manifest:
    """A complete two-split artifact written the way stages write one."""
    assert prepare_output(root, "tokenized", fp, overwrite=False).state is OutputState.FRESH
    files = []
    for split, n in (("train", rows), ("eval", 3)):
        bounds = shard_bounds(n, rows_per_shard)
        for i, (start, stop) in enumerate(bounds):
            files.append(write_shard(root, shard_path(split, i, len(bounds)), table(start, stop)))
    (root / "rejects.jsonl").write_text('{"reason": "empty"}\n')
    files.append(dataclasses.replace(file_entry(root, "rejects.jsonl"), rows=1))
    manifest = Manifest(
        kind="tokenized", fingerprint=fp, config={"max_seq_length": 1024}, files=files,
        inputs=[InputRef(kind="data", path="/data/x.jsonl", fingerprint="0" * 16)], stats={"pairs": rows},
    )
    commit_output(root, manifest)
    return manifest


def edit_manifest(root: Path, change) -> None:
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    manifest = build_artifact(tmp_path)
    again = read_manifest(tmp_path, kind="tokenized")
    assert again == manifest
    assert again.schema_version == SCHEMA_VERSION
    assert again.created and again.producer["name"] == "dpo"
    assert again.splits == ["train", "eval"]  # rejects.jsonl sits at the top: no split
    assert again.rows("train") == 10 and again.rows("eval") == 3
    assert [f.path for f in again.files_of("train")] == [
        "train/part-00000-of-00003.parquet", "train/part-00001-of-00003.parquet", "train/part-00002-of-00003.parquet"
    ]
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert set(on_disk) >= {"kind", "schema_version", "fingerprint", "inputs", "files", "config", "stats", "created",
                            "producer"}
    assert set(on_disk["files"][0]) == {"path", "rows", "bytes", "sha256"}
    assert not (tmp_path / PARTIAL).exists() and not (tmp_path / (MANIFEST + ".tmp")).exists()


def test_read_manifest_refusals(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        read_manifest(tmp_path / "nope")
    build_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="is a 'tokenized' artifact, expected 'train'"):
        read_manifest(tmp_path, kind="train")
    edit_manifest(tmp_path, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ArtifactError, match="newer than this dpo reads"):
        read_manifest(tmp_path)
    edit_manifest(tmp_path, lambda d: d.pop("fingerprint"))
    with pytest.raises(ArtifactError, match="not a valid dpo manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"kind": "tok')
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(tmp_path)


def test_write_manifest_refuses_unknown_kind_and_outside_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown artifact kind"):
        write_manifest(tmp_path, Manifest(kind="tokenised", fingerprint="x", config={}))
    bad = Manifest(kind="eval", fingerprint="x", config={}, files=[FileEntry("../x", None, 1, "0")])
    with pytest.raises(ArtifactError, match="outside"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / MANIFEST).exists()


@pytest.mark.parametrize("relative", ["../x.parquet", "train/../../x.parquet", "/etc/passwd", "", "train\\x.parquet"])
def test_resolve_inside_refuses_paths_out_of_the_folder(tmp_path, relative):
    with pytest.raises(ArtifactError, match=r"outside|not relative"):
        resolve_inside(tmp_path, relative)


def test_resolve_inside_refuses_a_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"x")
    root = tmp_path / "art"
    root.mkdir()
    (root / "link.parquet").symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside"):
        resolve_inside(root, "link.parquet")
    assert resolve_inside(root, "train/part.parquet") == (root / "train" / "part.parquet").resolve()


# ---------------------------------------------------------------- shards and reader


def test_shard_bounds_and_names():
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(8, 4) == [(0, 4), (4, 8)]
    assert shard_bounds(0, 4) == [(0, 0)]  # an empty split still has a file
    assert shard_path("eval", 3, 16) == "eval/part-00003-of-00016.parquet"


def test_write_shard_is_atomic_deterministic_and_resumable(tmp_path):
    rel = shard_path("train", 0, 2)
    entry = write_shard(tmp_path, rel, table(0, 5))
    target = tmp_path / rel
    assert entry == FileEntry(rel, 5, target.stat().st_size, hashlib.sha256(target.read_bytes()).hexdigest())
    assert list(target.parent.iterdir()) == [target]  # no .tmp left behind
    # the bytes depend only on the rows: a rerun writes the same file
    assert write_shard(tmp_path / "again", rel, table(0, 5)).sha256 == entry.sha256
    # a rerun after a crash takes a committed shard as it is, and redoes a missing or torn one
    assert committed_shard(tmp_path, rel) == entry
    assert committed_shard(tmp_path, shard_path("train", 1, 2)) is None
    torn = tmp_path / shard_path("train", 1, 2)
    torn.write_bytes(target.read_bytes()[: entry.bytes // 2])
    assert committed_shard(tmp_path, shard_path("train", 1, 2)) is None


def test_writer_commits_shard_by_shard_and_the_manifest_last(tmp_path):
    """Until commit_output, the directory holds committed shards but is not an artifact."""
    root = tmp_path / "out"
    fp = "a" * 16
    assert prepare_output(root, "tokenized", fp, overwrite=False, owns=SHARDS).state is OutputState.FRESH
    bounds = shard_bounds(10, 4)
    entries = []
    for i, (start, stop) in enumerate(bounds):
        entries.append(write_shard(root, shard_path("train", i, len(bounds)), table(start, stop)))
        assert committed_shard(root, entries[-1].path) == entries[-1]
        with pytest.raises(ArtifactError, match="not a complete artifact"):
            ArtifactReader(root)
        # a crash here and a rerun: the same fingerprint resumes, keeping the committed shards
        assert prepare_output(root, "tokenized", fp, overwrite=False, owns=SHARDS).state is OutputState.RESUME
        assert all((root / e.path).is_file() for e in entries)
    commit_output(root, Manifest(kind="tokenized", fingerprint=fp, config={}, files=entries))
    reader = ArtifactReader(root, kind="tokenized", verify=True)
    assert reader.fingerprint == fp and reader.splits == ["train"]
    assert reader.read_split("train").column("index").to_pylist() == list(range(10))
    assert reader.read_split("train", columns=["index"]).column_names == ["index"]
    assert prepare_output(root, "tokenized", fp, overwrite=False, owns=SHARDS).state is OutputState.COMPLETE


def test_reader_refuses_a_directory_without_manifest(tmp_path):
    write_shard(tmp_path, shard_path("train", 0, 1), table(0, 3))
    with pytest.raises(ArtifactError, match=f"no {MANIFEST}"):
        ArtifactReader(tmp_path)


@pytest.mark.parametrize("bad_path", ["../elsewhere.parquet", "/tmp/elsewhere.parquet"])
def test_reader_refuses_a_listed_path_outside_the_folder(tmp_path, bad_path):
    root = tmp_path / "art"
    build_artifact(root)
    (tmp_path / "elsewhere.parquet").write_bytes(b"not yours")
    edit_manifest(root, lambda d: d["files"][0].update(path=bad_path))
    with pytest.raises(ArtifactError, match=r"outside|not relative") as err:
        ArtifactReader(root)
    assert bad_path in str(err.value)


def test_reader_refuses_a_missing_file(tmp_path):
    build_artifact(tmp_path)
    (tmp_path / "train" / "part-00001-of-00003.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00001-of-00003.parquet is listed in the manifest but missing"):
        ArtifactReader(tmp_path)


def test_reader_refuses_a_wrong_byte_size(tmp_path):
    build_artifact(tmp_path)
    with open(tmp_path / "rejects.jsonl", "a") as f:
        f.write("{}\n")
    with pytest.raises(ArtifactError, match=r"rejects.jsonl has \d+ bytes, the manifest says \d+"):
        ArtifactReader(tmp_path)


def test_reader_verify_catches_a_corrupted_file(tmp_path):
    manifest = build_artifact(tmp_path)
    path = tmp_path / manifest.files_of("eval")[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    ArtifactReader(tmp_path, verify=False)  # size checks pass: --no-verify skips only the hashing
    with pytest.raises(ArtifactError, match="eval/part-00000-of-00001.parquet fails its sha256 check"):
        ArtifactReader(tmp_path)  # the default


def test_a_reader_hashing_in_the_background_refuses_every_read_of_a_corrupted_artifact(tmp_path):
    """Stages open their data with the sha256 check running on while they load the model: opening
    succeeds, but no byte of the artifact can be read until the check has passed."""
    manifest = build_artifact(tmp_path)
    intact = ArtifactReader(tmp_path, in_background=True)
    assert intact.read_split("train").column("index").to_pylist() == list(range(10))
    path = tmp_path / manifest.files_of("eval")[0].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = ArtifactReader(tmp_path, in_background=True)  # sizes match: the open itself succeeds
    for read in (lambda: reader.read_split("train"), lambda: reader.read_json("rejects.jsonl"),
                 lambda: reader.path(manifest.files[0].path), reader.verified):
        with pytest.raises(ArtifactError, match="eval/part-00000-of-00001.parquet fails its sha256 check"):
            read()
    assert ArtifactReader(tmp_path, verify=False, in_background=True).read_split("train").num_rows == 10


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_the_thread_that_asks_for_the_digests_hashes_what_is_left(tmp_path, monkeypatch, threads):
    """Hashing leaves one core to the stage until it asks for the result, then hashes with the others:
    with no hashing threads at all (one CPU) the asking thread hashes every file itself."""
    from dpo.artifacts import shards

    paths = []
    for k in range(7):
        paths.append(tmp_path / f"f{k}")
        paths[-1].write_bytes(os.urandom(3000 + k))
    monkeypatch.setattr(shards, "VERIFY_THREADS", threads)
    hashing = shards.Hashing(paths)
    assert hashing.result() == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert hashing.result() == [sha256_file(p) for p in paths]  # asked again: the same, nothing redone
    missing = shards.Hashing([*paths, tmp_path / "gone"])
    with pytest.raises(FileNotFoundError):
        missing.result()


def test_reader_refuses_a_corrupt_parquet_file_by_name_without_verify(tmp_path):
    manifest = build_artifact(tmp_path)
    path = tmp_path / manifest.files_of("train")[0].path
    path.write_bytes(b"\0" * path.stat().st_size)
    reader = ArtifactReader(tmp_path, verify=False)
    with pytest.raises(ArtifactError, match=f"{path}: not a readable Parquet file"):
        reader.read_split("train")


def test_reader_checks_row_counts_and_split_names(tmp_path):
    build_artifact(tmp_path)
    edit_manifest(tmp_path, lambda d: d["files"][0].update(rows=99))
    reader = ArtifactReader(tmp_path, verify=True)
    with pytest.raises(ArtifactError, match="part-00000-of-00003.parquet has 4 rows, the manifest says 99"):
        reader.read_split("train")
    with pytest.raises(ArtifactError, match=r"has no split 'test' \(splits: train, eval\)"):
        reader.read_split("test")


def test_reader_uses_the_file_list_not_a_glob(tmp_path):
    build_artifact(tmp_path)
    write_shard(tmp_path, "train/part-00099-of-00100.parquet", table(100, 200))  # a stray file
    assert ArtifactReader(tmp_path, verify=True).read_split("train").num_rows == 10


# ---------------------------------------------------------------- fingerprints


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    max_seq_length: int = 1024
    learning_rate: float = 5e-7
    data: tuple[str, ...] = ("a.jsonl",)
    options: dict = dataclasses.field(default_factory=lambda: {"x": 1, "y": [1, 2]})
    num_proc: int = dataclasses.field(default=1, metadata={"semantic": False})
    quiet: bool = dataclasses.field(default=False, metadata={"semantic": False})


def test_fingerprint_pinned_values():
    """Pinned literals: a change to canonicalisation or hashing invalidates every finished artifact
    of every user, so it must be deliberate (bump the stage versions instead)."""
    tokenize_config = {"max_seq_length": 1024, "truncation": "keep-start", "seed": 42, "data": ["a.jsonl:0.5"]}
    assert fingerprint("tokenize", 1, tokenize_config, []) == "28409b67704e7a56"
    train_config = {"beta": 0.1, "loss_type": "dpo", "learning_rate": 5e-7}
    assert fingerprint("train", 3, train_config, ["0123456789abcdef", "fedcba9876543210"]) == "d922c49f64f853f2"
    # the format, spelled out: sha256 of compact, key-sorted ASCII JSON, first 16 hex digits
    text = ('{"config":{"data":["a.jsonl:0.5"],"max_seq_length":1024,"seed":42,"truncation":"keep-start"},'
            '"inputs":[],"stage":"tokenize","version":1}')
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "28409b67704e7a56"


def test_fingerprint_ignores_dict_order_and_number_spelling():
    a = {"beta": 0.1, "epochs": 1, "nested": {"b": 2.0, "a": [1, 2.0]}}
    b = {"nested": {"a": [1.0, 2], "b": 2}, "epochs": 1.0, "beta": 0.1}
    assert fingerprint("train", 1, a) == fingerprint("train", 1, b)
    assert hash_json({"s": {3, 1, 2}}) == hash_json({"s": [1, 2, 3]})
    assert canonical(Path("x/y")) == "x/y"


def test_fingerprint_changes_with_what_changes_the_output():
    base = fingerprint("train", 1, {"beta": 0.1}, ["abc"])
    assert fingerprint("train", 2, {"beta": 0.1}, ["abc"]) != base  # stage version
    assert fingerprint("export", 1, {"beta": 0.1}, ["abc"]) != base  # stage
    assert fingerprint("train", 1, {"beta": 0.2}, ["abc"]) != base  # config value
    assert fingerprint("train", 1, {"beta": 0.1}, ["abd"]) != base  # an input's fingerprint
    assert fingerprint("train", 1, {"beta": 0.1}, []) != base
    assert fingerprint("train", 1, {"beta": 0.1, "x": None}, ["abc"]) != base
    assert fingerprint("train", 1, {"flag": True}) != fingerprint("train", 1, {"flag": 1})


def test_fingerprint_ignores_non_semantic_fields():
    base = ToyConfig()
    assert set(semantic_config(base)) == {"max_seq_length", "learning_rate", "data", "options"}
    assert fingerprint("tokenize", 1, base) == fingerprint("tokenize", 1, ToyConfig(num_proc=8, quiet=True))
    assert fingerprint("tokenize", 1, base) != fingerprint("tokenize", 1, ToyConfig(max_seq_length=512))
    assert fingerprint("tokenize", 1, base) == fingerprint("tokenize", 1, semantic_config(base))


def test_fingerprint_is_stable_across_python_runs(tmp_path):
    """Another interpreter with another hash seed (set and dict iteration order) agrees."""
    code = textwrap.dedent("""
        from dpo.artifacts.fingerprint import fingerprint
        print(fingerprint("t", 1, {"s": {"b", "a", "c", "d"}, "m": {"z": 1, "y": 2.0}}, ["i"]))
    """)
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {fingerprint("t", 1, {"s": {"a", "b", "c", "d"}, "m": {"y": 2, "z": 1}}, ["i"])}


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- lock

HOLDER = textwrap.dedent("""
    import sys, time
    from dpo.artifacts.lock import ArtifactLock
    lock = ArtifactLock(sys.argv[1], timeout_s=float(sys.argv[2])).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def start_holder(directory: Path, timeout_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(timeout_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_second_acquirer_gets_an_error_naming_the_holder(tmp_path):
    holder = start_holder(tmp_path, 600)
    try:
        with pytest.raises(LockHeldError) as err:
            ArtifactLock(tmp_path, timeout_s=600).acquire()
        message = str(err.value)
        assert f"host {socket.gethostname()}" in message and f"pid {holder.pid}" in message
        assert "since 20" in message and str(tmp_path) in message
        assert err.value.exit_code == 4
    finally:
        holder.kill()
        holder.wait()


def test_lock_in_one_process_excludes_and_releases(tmp_path):
    with ArtifactLock(tmp_path, timeout_s=600):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            ArtifactLock(tmp_path, timeout_s=600).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    with ArtifactLock(tmp_path, timeout_s=600):  # free again
        pass


def test_lock_of_a_holder_killed_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """A SIGKILLed job on the same host left a fresh heartbeat, but its pid is gone: no wait."""
    holder = start_holder(tmp_path, 600)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="dpo.artifacts.lock"):
        with ArtifactLock(tmp_path, timeout_s=600) as lock:
            assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert f"pid {holder.pid}" in caplog.text and "no longer exists" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == []  # no stale or tmp files left


def test_live_holder_on_this_host_keeps_its_lock(tmp_path):
    holder = start_holder(tmp_path, 600)
    try:
        with pytest.raises(LockHeldError, match=f"pid {holder.pid}"):
            ArtifactLock(tmp_path, timeout_s=600).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_from_another_host_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "node-417", "pid": 31337, "token": "dead", "since": time.time() - 4000, "heartbeat": time.time() - 30}
    ))
    with pytest.raises(LockHeldError, match="host node-417, pid 31337"):
        ArtifactLock(tmp_path, timeout_s=60).acquire()
    with caplog.at_level(logging.WARNING, logger="dpo.artifacts.lock"):
        with ArtifactLock(tmp_path, timeout_s=10):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()
    assert "node-417" in caplog.text


def test_lock_torn_file_is_judged_by_its_age(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"host": "a')  # a holder died mid-write
    with pytest.raises(LockHeldError):
        ArtifactLock(tmp_path, timeout_s=60).acquire()
    old = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with ArtifactLock(tmp_path, timeout_s=60):
        pass


def test_lock_heartbeat_refreshes(tmp_path):
    """With a 2 s timeout the holder beats every 0.5 s, so a live lock never looks stale."""
    with ArtifactLock(tmp_path, timeout_s=2.0) as lock:
        first = json.loads((tmp_path / LOCK_NAME).read_text())
        time.sleep(2.5)
        later = json.loads((tmp_path / LOCK_NAME).read_text())
        assert later["token"] == lock.token and later["since"] == first["since"]
        assert later["heartbeat"] > first["heartbeat"] + 1.0
        with pytest.raises(LockHeldError):  # older than the timeout since acquire, yet alive
            ArtifactLock(tmp_path, timeout_s=2.0).acquire()


# ---------------------------------------------------------------- output directory states


SHARDS = ("*/part-*.parquet",)  # what the stage declares it writes


def test_prepare_output_states(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(out, "tokenized", "a" * 16, overwrite=False, owns=SHARDS).state is OutputState.FRESH
    assert json.loads((out / PARTIAL).read_text()) == {"kind": "tokenized", "fingerprint": "a" * 16}
    write_shard(out, shard_path("train", 0, 2), table(0, 2))
    assert prepare_output(out, "tokenized", "a" * 16, overwrite=False, owns=SHARDS).state is OutputState.RESUME
    # a partial run of another config holds nothing complete: what it wrote is cleared and it starts over
    assert prepare_output(out, "tokenized", "b" * 16, overwrite=False, owns=SHARDS).state is OutputState.FRESH
    assert not (out / "train").exists()
    commit_output(out, Manifest(kind="tokenized", fingerprint="b" * 16, config={}))
    assert prepare_output(out, "tokenized", "b" * 16, overwrite=False, owns=SHARDS).state is OutputState.COMPLETE


def test_prepare_output_empty_existing_directory_is_fresh(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{}")  # the caller's own lock does not count as content
    assert prepare_output(tmp_path, "eval", "c" * 16, overwrite=False).state is OutputState.FRESH


def test_prepare_output_different_fingerprint_needs_overwrite(tmp_path):
    build_artifact(tmp_path, fp="1" * 16)
    with pytest.raises(ArtifactError, match=f"fingerprint {'1' * 16}.*{'2' * 16}.*--overwrite") as err:
        prepare_output(tmp_path, "tokenized", "2" * 16, overwrite=False)
    assert err.value.exit_code == 3
    assert read_manifest(tmp_path).fingerprint == "1" * 16  # untouched
    with ArtifactLock(tmp_path, timeout_s=600):
        # The replacement is built beside the old artifact, which stays readable until it commits.
        output = prepare_output(tmp_path, "tokenized", "2" * 16, overwrite=True)
        assert output.state is OutputState.FRESH and output.dir == tmp_path / ".dpo-next"
        assert read_manifest(tmp_path).fingerprint == "1" * 16
        write_shard(output.dir, shard_path("train", 0, 1), table(0, 5))
        commit_output(tmp_path, Manifest(kind="tokenized", fingerprint="2" * 16, config={},
                                         files=[committed_shard(output.dir, shard_path("train", 0, 1))]), output.dir)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK_NAME, MANIFEST, "train"])  # lock kept
        reader = ArtifactReader(tmp_path)
        assert reader.fingerprint == "2" * 16 and reader.read_split("train").num_rows == 5
    # another kind in the same place is a different artifact too
    build_artifact(tmp_path / "k", fp="1" * 16)
    with pytest.raises(ArtifactError, match="'tokenized' artifact"):
        prepare_output(tmp_path / "k", "ref-logps", "1" * 16, overwrite=False)


def test_prepare_output_refuses_a_non_artifact_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ArtifactError, match="not empty and is not a dpo artifact"):
            prepare_output(tmp_path, "train", "d" * 16, overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_two_jobs_racing_for_a_stale_lock_do_not_both_win(tmp_path, monkeypatch):
    """Job A judges the lock stale; before A's rename, job B takes the stale lock over and writes its
    own. A's rename then moves B's live lock: A must give it back and fail, not hold it too."""
    import dpo.artifacts.lock as lock_module

    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "dead", "pid": 1, "token": "dead", "since": 0, "heartbeat": time.time() - 99}))
    real_rename = os.rename
    raced = []

    def rename_after_rival(src, dst):
        if not raced and Path(src) == path:
            raced.append(True)
            real_rename(src, str(dst) + ".rival")  # B's takeover of the stale lock ...
            Path(str(dst) + ".rival").unlink()
            path.write_text(json.dumps(  # ... and B's fresh lock
                {"host": "node-b", "pid": 4242, "token": "rival", "since": time.time(), "heartbeat": time.time()}
            ))
        return real_rename(src, dst)

    monkeypatch.setattr(lock_module.os, "rename", rename_after_rival)
    with pytest.raises(LockHeldError, match="host node-b, pid 4242"):
        ArtifactLock(tmp_path, timeout_s=10).acquire()
    assert raced and json.loads(path.read_text())["token"] == "rival"
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
