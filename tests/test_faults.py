"""The fault suite (issue 9): bad inputs, damaged artifacts and dangerous --out folders, stage by stage.

Each case is one command on a copy of a small pipeline (tests/faultkit.py: every artifact kind, built
once per process), an optional damage done to that copy first, the exit code expected and a fragment
the message must hold (what is wrong, named). Every case also checks what any fault must leave:

- no traceback, and nothing committed in a fresh --out (no manifest.json);
- every file that existed before (the inputs, and an old artifact in --out) byte-identical afterwards.

The cases run in this process through the real CLI (typer's CliRunner on dpo.cli.app): a case costs a
fraction of a second. Crashes and signals, which need a process to die, are in test_crash_points.py
and test_signals.py; a full disk in test_disk_full.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import faultkit

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> faultkit.World:
    return faultkit.world(tmp_path_factory)


# ----------------------------------------------------------------------------------- damage done before a case


def swap_sides(relative: str):
    """Chosen and rejected swapped in a shard (tokens, or reference log-probs): a valid Parquet file of the
    same size, whose rows say the opposite of what they said. Only the sha256 can tell."""

    def damage(d: Path) -> None:
        path = d / relative
        table = pq.read_table(path)
        columns = {name: table[name] for name in table.column_names}
        for name in table.column_names:
            if name.startswith("chosen_"):
                other = "rejected_" + name[len("chosen_"):]
                columns[name], columns[other] = table[other], table[name]
        size = path.stat().st_size
        pq.write_table(pa.table(columns, schema=table.schema), path, compression="zstd",
                       row_group_size=max(1, min(table.num_rows, 8192)))
        assert path.stat().st_size == size, "the swapped shard must keep its size for this case"

    return damage


def flip_byte(relative: str, at: float = 0.5):
    def damage(d: Path) -> None:
        path = d / relative
        data = bytearray(path.read_bytes())
        data[int(len(data) * at)] ^= 0x5A
        path.write_bytes(bytes(data))

    return damage


def zeros(relative: str):
    """The file's bytes replaced by as many zero bytes: the size check passes, the content is garbage."""
    return lambda d: (d / relative).write_bytes(b"\0" * (d / relative).stat().st_size)


def write(relative: str, content: bytes | str):
    def damage(d: Path) -> None:
        (d / relative).parent.mkdir(parents=True, exist_ok=True)
        (d / relative).write_bytes(content.encode() if isinstance(content, str) else content)

    return damage


def edit_json(relative: str, change):
    def damage(d: Path) -> None:
        path = d / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return damage


def unpartial(artifact: str, kind: str):
    """The artifact made partial again (its manifest gone, the marker of a run of ``kind`` back)."""

    def damage(d: Path) -> None:
        (d / artifact / "manifest.json").unlink()
        (d / artifact / ".dpo-partial.json").write_text(json.dumps({"kind": kind, "fingerprint": "0" * 16}))

    return damage


def symlink(target: str, name: str):
    return lambda d: os.symlink(d / target, d / name)


def both(*damages):
    def damage(d: Path) -> None:
        for one in damages:
            one(d)

    return damage


# ----------------------------------------------------------------------------------------------- the cases

T, C, TR, E, EV = "tokenize", "cache-ref", "train", "export", "evaluate"
NV = "--no-verify"
CKPT = "train/checkpoints/step-00000002"
FP16 = "0" * 16

# (id, stage, extra arguments (--out last), damage, exit code, what the message must name)
CASES = [
    # -- section 1: --out is, contains or lies inside an input: refused before anything is touched (exit 2)
    ("tokenize-out-is-the-data-file", T, ["--out", "{data}"], None, 2, r"--out .*data.jsonl is a file"),
    ("tokenize-out-contains-the-data", T, ["--out", "{dir}"], None, 2, r"contains the input --data .*data.jsonl"),
    ("tokenize-out-is-the-tokenizer", T, ["--out", "{llama}", "--overwrite"], None, 2, r"is the input --tokenizer"),
    ("tokenize-out-inside-the-tokenizer", T, ["--out", "{llama}/tok"], None, 2, r"lies inside the input --tokenizer"),
    ("tokenize-out-holds-its-data", T, ["--data", "{tok}/rejects.jsonl", "--out", "{tok}", "--overwrite"], None, 2,
     r"contains the input --data .*rejects.jsonl"),
    ("cache-ref-out-is-tokenized", C, ["--out", "{tok}", "--overwrite"], None, 2, r"is the input --tokenized"),
    ("cache-ref-out-inside-tokenized", C, ["--out", "{tok}/train"], None, 2, r"lies inside the input --tokenized"),
    ("cache-ref-out-is-the-model", C, ["--out", "{llama}", "--overwrite"], None, 2, r"is the input --model"),
    ("cache-ref-out-symlink-into-tokenized", C, ["--out", "{dir}/link"], symlink("tok/train", "link"), 2,
     r"lies inside the input --tokenized"),
    ("train-out-is-tokenized", TR, ["--out", "{tok}", "--overwrite"], None, 2, r"is the input --tokenized"),
    ("train-out-is-the-ref-cache", TR, ["--out", "{ref}", "--overwrite"], None, 2, r"is the input --ref-cache"),
    ("train-out-is-the-model", TR, ["--out", "{llama}", "--overwrite"], None, 2, r"is the input --model"),
    ("train-out-contains-its-inputs", TR, ["--out", "{dir}"], None, 2, r"contains the input --tokenized"),
    ("export-out-is-train", E, ["--out", "{train}", "--overwrite"], None, 2, r"is the input --train"),
    ("export-out-inside-train-final", E, ["--out", "{train}/final", "--overwrite"], None, 2,
     r"lies inside the input --train"),
    ("export-out-is-the-trained-tokenized", E, ["--out", "{world_tok}", "--overwrite"], None, 2,
     r"is the input the train run's tokenized artifact"),
    ("export-out-is-the-trained-model", E, ["--out", "{world_llama}", "--overwrite"], None, 2,
     r"is the input the train run's --model"),
    ("evaluate-out-is-the-model", EV, ["--out", "{model}", "--overwrite"], None, 2, r"is the input --model"),
    ("evaluate-out-is-tokenized", EV, ["--out", "{tok}", "--overwrite"], None, 2, r"is the input --tokenized"),
    ("evaluate-out-is-the-ref-cache", EV, ["--out", "{ref}", "--overwrite"], None, 2, r"is the input --ref-cache"),
    ("evaluate-out-is-train", EV, ["--train", "{train}", "--out", "{train}", "--overwrite"], None, 2,
     r"is the input --train"),
    ("evaluate-out-is-the-baseline", EV, ["--baseline", "{eval}", "--out", "{eval}", "--overwrite"], None, 2,
     r"is the input --baseline"),
    # -- a folder holding what a stage cannot account for is refused, naming a file (exit 3)
    ("cache-ref-out-holds-notes", C, ["--out", "{dir}/notes"], write("notes/notes.md", "mine"), 3,
     r"not a dpo artifact .*notes.md"),
    ("evaluate-overwrite-keeps-notes", EV, ["--out", "{eval}", "--overwrite", "--split", "train"],
     write("eval/notes.txt", "mine"), 3, r"not part of the eval artifact .*notes.txt"),
    ("evaluate-overwrite-keeps-a-png", EV, ["--out", "{eval}", "--overwrite", "--split", "train"],
     write("eval/figure.png", "mine"), 3, r"eval/figure.png"),
    ("evaluate-overwrite-keeps-a-tmp-file", EV, ["--out", "{eval}", "--overwrite", "--split", "train"],
     write("eval/draft.tmp", "mine"), 3, r"eval/draft.tmp"),
    ("export-overwrite-keeps-notes", E, ["--out", "{model}", "--overwrite", "--checkpoint", "step-2"],
     write("model/notes.txt", "mine"), 3, r"not part of the model artifact .*notes.txt"),
    ("export-overwrite-keeps-json-notes", E, ["--out", "{model}", "--overwrite", "--checkpoint", "step-2"],
     write("model/results.json", "{}"), 3, r"model/results.json"),
    ("train-resume-keeps-notes", TR, ["--out", "{train}"], both(unpartial("train", "train"),
                                                                 write("train/notes.txt", "x")), 3, r"notes.txt"),
    ("cache-ref-into-a-partial-tokenize", C, ["--out", "{tok}2"],
     lambda d: shutil.copytree(d / "tok", d / "tok2") and unpartial("tok2", "tokenized")(d), 3,
     r"partial 'tokenized' run"),
    ("export-into-another-kind", E, ["--out", "{eval}", "--overwrite"], None, 3, r"holds a 'eval' artifact"),
    # -- bad input or options with an old complete artifact in --out: refused, the old one intact
    ("evaluate-overwrite-bad-input", EV, ["--tokenized", "{ref}", "--out", "{eval}", "--overwrite"], None, 3,
     r"is a 'ref-logps' artifact, expected 'tokenized'"),
    ("cache-ref-overwrite-bad-split", C, ["--out", "{ref}", "--overwrite", "--split", "nope"], None, 2,
     r"--split nope"),
    ("train-overwrite-bad-option", TR, ["--out", "{train}", "--overwrite", "--learning-rate", "-1"], None, 2,
     r"--learning-rate"),
    ("export-overwrite-no-such-step", E, ["--out", "{model}", "--overwrite", "--checkpoint", "step-9"], None, 3,
     r"no complete checkpoint step-9"),
    ("tokenize-overwrite-missing-data", T, ["--data", "{dir}/nope.jsonl", "--out", "{tok}", "--overwrite"], None, 2,
     r"nope.jsonl"),
    ("unreadable-manifest-in-out-without-overwrite", C, ["--out", "{ref}"], write("ref/manifest.json", "{"), 3,
     r"ref/manifest.json.*pass --overwrite"),
    ("rerun-over-a-damaged-artifact", C, ["--out", "{ref}"], write("ref/train/part-00000-of-00003.parquet", "x"), 3,
     r"ref is complete for this fingerprint but damaged: train/part-00000-of-00003.parquet has 1 bytes.*--overwrite"),
    # -- locks
    ("lock-file-that-is-garbage", C, ["--out", "{dir}/o"], write("o/.dpo.lock", "[1, 2]"), 4,
     r"\.dpo\.lock is not a lock record"),
    ("lock-file-not-utf8", C, ["--out", "{dir}/o"], write("o/.dpo.lock", b"\xff\xfe"), 4, r"not a lock record"),
    ("lock-that-is-a-folder", C, ["--out", "{dir}/o"], write("o/.dpo.lock/x", "x"), 3, r"\.dpo\.lock is a folder"),
    ("lock-timeout-zero", C, ["--out", "{dir}/o", "--lock-timeout", "0"], None, 2, r"--lock-timeout must be a positive"),
    ("lock-timeout-negative", C, ["--out", "{dir}/o", "--lock-timeout", "-5"], None, 2, r"--lock-timeout"),
    ("lock-timeout-infinite", C, ["--out", "{dir}/o", "--lock-timeout", "inf"], None, 2, r"--lock-timeout"),
    ("lock-timeout-nan", C, ["--out", "{dir}/o", "--lock-timeout", "nan"], None, 2, r"--lock-timeout"),
    # -- section 2: data that is not what its manifest says (exit 3, naming the file)
    ("cache-ref-swapped-tokens", C, ["--out", "{dir}/o"], swap_sides("tok/train/part-00001-of-00003.parquet"), 3,
     r"train/part-00001-of-00003.parquet fails its sha256"),
    ("train-swapped-tokens", TR, ["--out", "{dir}/o"], swap_sides("tok/train/part-00000-of-00003.parquet"), 3,
     r"train/part-00000-of-00003.parquet fails its sha256"),
    ("train-swapped-ref-logps", TR, ["--out", "{dir}/o"], swap_sides("ref/train/part-00000-of-00003.parquet"), 3,
     r"ref: train/part-00000-of-00003.parquet fails its sha256"),
    ("evaluate-swapped-tokens", EV, ["--out", "{dir}/o"], swap_sides("tok/eval/part-00000-of-00001.parquet"), 3,
     r"eval/part-00000-of-00001.parquet fails its sha256"),
    ("evaluate-swapped-ref-logps", EV, ["--out", "{dir}/o"], swap_sides("ref/eval/part-00000-of-00001.parquet"), 3,
     r"ref: eval/part-00000-of-00001.parquet fails its sha256"),
    ("export-changed-final-weights", E, ["--out", "{dir}/o"], flip_byte("train/final/model.safetensors"), 3,
     r"final/model.safetensors fails its sha256"),
    ("evaluate-changed-model-weights", EV, ["--out", "{dir}/o"], flip_byte("model/model.safetensors"), 3,
     r"model.safetensors fails its sha256"),
    ("evaluate-changed-train-metrics", EV, ["--train", "{train}", "--out", "{dir}/o"],
     flip_byte("train/metrics.jsonl", 0.1), 3, r"metrics.jsonl fails its sha256"),
    ("export-damaged-checkpoint", E, ["--out", "{dir}/o", "--checkpoint", "step-2"],
     flip_byte(f"{CKPT}/state/optimizer.pt"), 3, r"step-00000002 is damaged: .*optimizer.pt"),
    ("export-checkpoint-with-an-unlisted-file", E, ["--out", "{dir}/o", "--checkpoint", "step-2"],
     write(f"{CKPT}/state/extra.pt", "x"), 3, r"extra.pt: a file the checkpoint manifest does not list"),
    ("export-checkpoint-manifest-without-files", E, ["--out", "{dir}/o", "--checkpoint", "step-2"],
     edit_json(f"{CKPT}/manifest.json", lambda m: m.pop("files")), 3, r"field 'files' is missing"),
    ("export-checkpoint-manifest-garbage", E, ["--out", "{dir}/o", "--checkpoint", "step-2"],
     write(f"{CKPT}/manifest.json", b"\xff{"), 3, r"ignoring checkpoint .*step-00000002: unreadable manifest"),
    ("manifest-without-files", C, ["--out", "{dir}/o"], edit_json("tok/manifest.json", lambda m: m.pop("files")), 3,
     r"tok/manifest.json: field 'files' is missing"),
    ("manifest-kind-mistyped", TR, ["--out", "{dir}/o"], edit_json("ref/manifest.json", lambda m: m.update(kind=3)), 3,
     r"ref/manifest.json: field 'kind' must be str"),
    ("manifest-bytes-mistyped", EV, ["--out", "{dir}/o"],
     edit_json("tok/manifest.json", lambda m: m["files"][0].update(bytes="12")), 3, r"field 'files\[0\].bytes'"),
    ("manifest-not-utf8", E, ["--out", "{dir}/o"], write("train/manifest.json", b"\xff\xfe{}"), 3,
     r"train/manifest.json: unreadable manifest, not UTF-8 JSON"),
    ("manifest-not-json", C, ["--out", "{dir}/o"], write("tok/manifest.json", "{kind: tokenized"), 3,
     r"tok/manifest.json: unreadable manifest"),
    ("manifest-a-list", C, ["--out", "{dir}/o"], write("tok/manifest.json", "[]"), 3, r"must be a JSON object"),
    ("manifest-lists-a-folder", C, ["--out", "{dir}/o"],
     edit_json("tok/manifest.json", lambda m: m["files"].append(dict(m["files"][0], path="train"))), 3,
     r"train is listed in the manifest but is a folder"),
    ("manifest-path-leads-outside", C, ["--out", "{dir}/o"],
     edit_json("tok/manifest.json", lambda m: m["files"][0].update(path="../data.jsonl")), 3, r"leads outside"),
    ("manifest-from-a-newer-dpo", C, ["--out", "{dir}/o"],
     edit_json("tok/manifest.json", lambda m: m.update(schema_version=99)), 3, r"newer than this dpo reads"),
    ("no-verify-still-checks-sizes", C, ["--out", "{dir}/o", NV], write("tok/train/part-00000-of-00003.parquet", "x"),
     3, r"part-00000-of-00003.parquet has 1 bytes, the manifest says \d+"),
    ("no-verify-still-checks-row-counts", C, ["--out", "{dir}/o", NV],
     edit_json("tok/manifest.json", lambda m: m["files"][0].update(rows=m["files"][0]["rows"] + 1)), 3,
     r"part-00000-of-00003.parquet has 12 rows, the manifest says 13"),
    # readers memory-map the Arrow copy of a tokenized shard: that is the file they must find damaged
    ("corrupt-arrow-copy-no-verify", C, ["--out", "{dir}/o", NV], zeros("tok/train/part-00000-of-00003.arrow"), 3,
     r"part-00000-of-00003.arrow: not a readable Arrow IPC file"),
    ("corrupt-ref-parquet-no-verify", TR, ["--out", "{dir}/o", NV], zeros("ref/train/part-00000-of-00003.parquet"), 3,
     r"part-00000-of-00003.parquet: not a readable Parquet file"),
    ("corrupt-final-weights-no-verify", E, ["--out", "{dir}/o", NV], zeros("train/final/model.safetensors"), 3,
     r"final: a weight file is corrupt"),
    ("corrupt-checkpoint-weights-no-verify", E, ["--out", "{dir}/o", "--checkpoint", "step-2", NV],
     zeros(f"{CKPT}/model/model.safetensors"), 3, r"step-00000002/model: a weight file is corrupt"),
    ("corrupt-model-weights-no-verify", EV, ["--out", "{dir}/o", NV], zeros("model/model.safetensors"), 3,
     r"a weight file is corrupt"),
    ("corrupt-base-model-weights", TR, ["--out", "{dir}/o"], zeros("llama/model.safetensors"), 3,
     r"llama: a weight file is corrupt"),
    ("evaluate-model-is-a-train-artifact", EV, ["--model", "{train}", "--out", "{dir}/o"], None, 2,
     r"is a 'train' artifact, not a model: evaluate its final model"),
    ("export-of-unfinished-training", E, ["--out", "{dir}/o"], unpartial("train", "train"), 3,
     r"training has not finished"),
    # -- dpo status reads what it can and says what is wrong, never a traceback
    ("status-damaged-artifact", "status", ["{tok}"], write("tok/train/part-00002-of-00003.parquet", "short"), 0,
     r"damaged .*\n.*part-00002-of-00003.parquet: 5 bytes, the manifest says \d+(.|\n)*rerun it with --overwrite"),
    ("status-garbage-partial-marker", "status", ["{ref}"],
     both(lambda d: (d / "ref/manifest.json").unlink(), write("ref/.dpo-partial.json", b"\xff[]")), 0, r"partial"),
    ("status-garbage-checkpoint-manifest", "status", ["{train}"],
     both(unpartial("train", "train"), write(f"{CKPT}/manifest.json", "[1]")), 0, r"unreadable|not a JSON object|partial"),
    ("status-garbage-metrics", "status", ["{train}"],
     both(unpartial("train", "train"), write("train/metrics.jsonl", b"[1]\n\xff\n")), 0, r"partial"),
    ("status-run-file-not-a-mapping", "status", ["{dir}"], write("run.yaml", "- 1\n"), 2, r"run.yaml: not a run file"),
    ("status-corrupt-manifest", "status", ["{eval}"], write("eval/manifest.json", b"\xff"), 0, r"corrupt"),
    # -- siblings: odd paths and unreadable inputs, in every stage
    ("tokenize-data-is-a-folder", T, ["--data", "{tok}", "--out", "{dir}/o"], None, 2, r"tok"),
    ("tokenize-data-is-a-fifo", T, ["--data", "{dir}/pipe.jsonl", "--out", "{dir}/o"],
     lambda d: os.mkfifo(d / "pipe.jsonl"), 2, r"pipe.jsonl"),
    ("cache-ref-tokenized-missing", C, ["--tokenized", "{dir}/nope", "--out", "{dir}/o"], None, 3, r"nope"),
    ("cache-ref-tokenized-is-a-file", C, ["--tokenized", "{data}", "--out", "{dir}/o"], None, 3, r"data.jsonl"),
    ("train-out-under-a-file", TR, ["--out", "{data}/o"], None, 2, r"lies under the file .*data.jsonl"),
    ("export-out-is-a-file", E, ["--out", "{dir}/f"], write("f", "mine"), 2, r"--out .*/f is a file"),
    ("evaluate-out-dangling-symlink", EV, ["--out", "{dir}/link"], lambda d: os.symlink(d / "gone", d / "link"), 2,
     r"symbolic link"),
    ("train-lock-timeout-negative", TR, ["--out", "{dir}/o", "--lock-timeout", "-1"], None, 2, r"--lock-timeout"),
    ("export-lock-timeout-nan", E, ["--out", "{dir}/o", "--lock-timeout", "nan"], None, 2, r"--lock-timeout"),
    ("evaluate-lock-timeout-inf", EV, ["--out", "{dir}/o", "--lock-timeout", "inf"], None, 2, r"--lock-timeout"),
    ("train-config-is-a-folder", TR, ["--config", "{dir}", "--out", "{dir}/o"], None, 2, r"--config"),
    ("status-of-a-file", "status", ["{data}"], None, 2, r"data.jsonl"),
    ("status-of-a-missing-folder", "status", ["{dir}/nope"], None, 2, r"nope"),
    ("status-of-a-foreign-folder", "status", ["{dir}/mine"], write("mine/notes.txt", "x"), 2,
     r"mine: neither an artifact .* nor a folder holding artifacts"),
    ("export-train-is-tokenized", E, ["--train", "{tok}", "--out", "{dir}/o"], None, 3,
     r"'tokenized' artifact, expected 'train'"),
    # -- dpo run: its own record never costs a user a file
    ("run-file-is-its-own-record", "run", ["--config", "{dir}/run.yaml"],
     write("run.yaml", "# mine\nrun_dir: .\ntokenize: {data: data.jsonl, tokenizer: llama}\n"), 2,
     r"run.yaml is the run file given to --config"),
    ("run-dir-inside-the-model", "run", ["--config", "{dir}/r.yaml"],
     write("r.yaml", "run_dir: llama/runs\nmodel: llama\ntokenize: {data: data.jsonl, tokenizer: llama}\n"), 2,
     r"run_dir \S*/case/llama/runs lies inside \S*/case/llama \(model\)"),
]

# Section 4: configuration mistakes, each an error naming the input, never dropped data.
INPUT_CASES = [
    ("data-not-utf8", T, ["--data", "{dir}/bad.jsonl", "--out", "{dir}/o"], write("bad.jsonl", b'{"prompt": "\xff"}\n'),
     2, r"bad.jsonl.*line 1"),
    ("data-lone-surrogate", T, ["--data", "{dir}/bad.jsonl", "--out", "{dir}/o"],
     write("bad.jsonl", '{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}\n'), 2, r"bad.jsonl.*line 1"),
    ("data-amount-not-a-number", T, ["--data", "{data}:lots", "--out", "{dir}/o"], None, 2, r"lots"),
    ("data-amount-zero", T, ["--data", "{data}:0", "--out", "{dir}/o"], None, 2, r"data.jsonl:0"),
    ("data-amount-above-the-rows", T, ["--data", "{data}:100000", "--out", "{dir}/o"], None, 2, r"100000"),
    ("eval-data-overlaps-data", T, ["--eval-data", "{data}", "--out", "{dir}/o"], None, 2, r"overlap"),
    ("train-model-vocab-too-small", TR, ["--model", "{dir}/small", "--out", "{dir}/o"],
     lambda d: _small_vocab_model(d / "small"), 2, r"vocabulary"),
    ("evaluate-baseline-of-another-split", EV, ["--baseline", "{eval}", "--split", "train", "--out", "{dir}/o"], None,
     2, r"baseline"),
    ("evaluate-baseline-metrics-garbage", EV, ["--baseline", "{eval}", "--out", "{dir}/o", NV],
     zeros("eval/metrics.json"), 3, r"eval/metrics.json"),
]


def _small_vocab_model(path: Path) -> None:
    from conftest import GPT2_TOKENIZER, build_tiny_llama

    build_tiny_llama(path, tokenizer_dir=GPT2_TOKENIZER)
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 100
    (path / "config.json").write_text(json.dumps(config))


def run_case(world: faultkit.World, case_dir: Path, stage: str, extra: list[str], damage, code: int, fragment: str):
    copy = faultkit.copy_world(world, case_dir)
    paths = {**copy.paths(), "dir": str(case_dir), "world_tok": str(world.tok), "world_llama": str(world.llama)}
    if damage is not None:
        damage(case_dir)
    args = [a.format(**paths) for a in extra]
    argv = [stage, *args] if stage in ("status", "run") else [*faultkit.stage_args(paths, stage), *args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    fresh_out = out is not None and not out.exists() and not out.is_symlink()
    watched = [case_dir, world.root]
    before = [faultkit.digest(root, skip=(out,) if fresh_out else ()) for root in watched]
    cwd = os.getcwd()
    os.chdir(case_dir)  # for the relative paths of the run-file cases
    try:
        result = faultkit.invoke(argv)
    finally:
        os.chdir(cwd)
    output = result.output
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{output[-3000:]}"
    assert not isinstance(result.exception, Exception) and "Traceback" not in output, output[-3000:]
    assert re.search(fragment, output), f"{fragment!r} not in:\n{output[-3000:]}"
    if code != 0 and fresh_out:
        assert not (out / "manifest.json").exists(), "a failed stage committed an artifact"
    after = [faultkit.digest(root, skip=(out,) if fresh_out else ()) for root in watched]
    for root, old, new in zip(watched, before, after):
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        assert not changed, f"files under {root} changed: {changed[:10]}"


@pytest.mark.parametrize("name, stage, extra, damage, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_fault(world, tmp_path, name, stage, extra, damage, code, fragment):
    run_case(world, tmp_path / "case", stage, extra, damage, code, fragment)


@pytest.mark.parametrize("name, stage, extra, damage, code, fragment", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_configuration_mistake(world, tmp_path, name, stage, extra, damage, code, fragment):
    run_case(world, tmp_path / "case", stage, extra, damage, code, fragment)


@pytest.mark.parametrize("stage, relative", [("tokenize", "data.jsonl"), ("cache-ref", "tok/train/part-00001-of-00003.parquet"),
                                             ("export", "train/final/model.safetensors")])
def test_an_unreadable_input(world, tmp_path, stage, relative):
    """chmod 000 on an input: exit 2 naming the file. Root reads it anyway (permissions do not bind it),
    so there the stage must simply succeed on the intact file; which of the two ran is in the id's output."""
    copy = faultkit.copy_world(world, tmp_path / "case")
    target = tmp_path / "case" / relative
    target.chmod(0)
    result = faultkit.invoke([*faultkit.stage_args(copy, stage), "--out", tmp_path / "o"])
    target.chmod(0o644)
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception), result.output
    if os.geteuid() == 0:
        print("running as root: chmod 000 does not stop root, the stage must read the file")
        assert result.exit_code == 0, result.output[-3000:]
    else:
        assert result.exit_code == 2 and f"{target}: Permission denied" in result.output, result.output[-3000:]
        assert not (tmp_path / "o" / "manifest.json").exists()


def _interrupted_training(copy: faultkit.World) -> list[Path]:
    """The train artifact as a run killed after its last checkpoint left it; its checkpoints, oldest first."""
    fingerprint = faultkit.fingerprint(copy.train)
    (copy.train / "manifest.json").unlink()
    shutil.rmtree(copy.train / "final")
    (copy.train / ".dpo-partial.json").write_text(json.dumps({"kind": "train", "fingerprint": fingerprint}))
    return sorted((copy.train / "checkpoints").iterdir())


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(world, tmp_path):
    """A newer checkpoint (step 3, made from step 2's files: it is never loaded) whose optimizer state no
    longer matches its manifest: skipped with a warning naming it, training resumes from step 2."""
    copy = faultkit.copy_world(world, tmp_path / "case")
    [intact] = _interrupted_training(copy)
    newest = intact.with_name("step-00000003")
    shutil.copytree(intact, newest)
    edit_json("manifest.json", lambda m: m.update(step=3))(newest)
    flip_byte("state/optimizer.pt")(newest)
    checkpoints = [intact, newest]
    result = faultkit.invoke([*faultkit.stage_args(copy, "train"), "--out", copy.train])
    assert result.exit_code == 0, result.output[-3000:]
    assert f"skipping the damaged checkpoint {checkpoints[-1]}" in result.output, result.output[-3000:]
    assert "optimizer.pt" in result.output
    shutil.rmtree(newest)  # the uninterrupted run has no step 3 to compare with
    faultkit.assert_same("train", copy.train, world.train)


def test_no_intact_checkpoint_is_exit_3_naming_one(world, tmp_path):
    copy = faultkit.copy_world(world, tmp_path / "case")
    for checkpoint in _interrupted_training(copy):
        flip_byte(f"train/checkpoints/{checkpoint.name}/model/model.safetensors")(tmp_path / "case")
    before = faultkit.digest(copy.train)
    result = faultkit.invoke([*faultkit.stage_args(copy, "train"), "--out", copy.train])
    assert result.exit_code == 3 and "Traceback" not in result.output, result.output[-3000:]
    assert re.search(r"no intact checkpoint to resume from in .*checkpoints: .*model.safetensors", result.output)
    assert faultkit.digest(copy.train) == before


def test_overwrite_rebuilds_a_damaged_artifact_of_the_same_fingerprint(world, tmp_path):
    """What every "fails its sha256" message asks for works: --overwrite rebuilds the damaged artifact
    (with the same fingerprint a plain rerun is a no-op that would keep it damaged)."""
    copy = faultkit.copy_world(world, tmp_path / "case")
    swap_sides("ref/train/part-00001-of-00003.parquet")(tmp_path / "case")
    argv = [*faultkit.stage_args(copy, "cache-ref"), "--out", copy.ref, "--overwrite"]
    result = faultkit.invoke(argv)
    assert result.exit_code == 0 and "is damaged" in result.output, result.output
    assert faultkit.listed_sha256(copy.ref) == faultkit.listed_sha256(world.ref)
    assert faultkit.fingerprint(copy.ref) == faultkit.fingerprint(world.ref)
    assert {k: v for k, v in faultkit.digest(copy.ref).items() if k != "manifest.json"} == {
        k: v for k, v in faultkit.digest(world.ref).items() if k != "manifest.json"}
    assert "nothing to do" in faultkit.invoke([a for a in argv if a != "-q"]).output


def test_the_suite_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
