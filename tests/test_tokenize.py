"""`dpo tokenize` end to end: formats, masking, truncation, mixing, rejects, reruns, errors, resume.

Most tests call the stage in-process (fast); the exit-code and message tests drive the real CLI.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import DEMO_MODEL, DPO, GPT2_TOKENIZER, HH_DATA, SHAREGPT_DATA, dpo_env, run_dpo
from dpo.artifacts.fingerprint import fingerprint
from dpo.artifacts.lock import ArtifactLock
from dpo.artifacts.shards import ArtifactReader
from dpo.artifacts.errors import ArtifactError, DataError, UsageError
from dpo.stages.tokenize import TOKENIZE_VERSION, TokenizeConfig, run, semantic_config
from refusals import assert_refused, dpo_in_process

HH = str(HH_DATA)
SHAREGPT = str(SHAREGPT_DATA)


def tokenize(out: Path, *data: str, tokenizer: Path = DEMO_MODEL, **options):
    return run(TokenizeConfig(data=tuple(data), tokenizer=str(tokenizer), out=str(out), quiet=True, **options))


def rows(out: Path, split: str = "train") -> list[dict]:
    """The pairs as tokenize wrote them: its Parquet shards, every column (the Arrow copies that stages
    read leave the labels out)."""
    reader = ArtifactReader(out, kind="tokenized", verify=True)
    shards = [e for e in reader.manifest.files_of(split) if e.path.endswith(".parquet")]
    return [row for e in shards for row in pq.read_table(reader.path(e.path)).to_pylist()]


def shard_bytes(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {f["path"]: (out / f["path"]).read_bytes() for f in manifest["files"]}


def labelled(ids: list[int], labels: list[int]) -> list[int]:
    assert len(ids) == len(labels)
    kept = [t for t, l in zip(ids, labels) if l != -100]
    assert kept == [t for t, l in zip(ids, labels) if l == t], "a label differs from its token"
    return kept


def hh_lines() -> list[dict]:
    with gzip.open(HH_DATA, "rt") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ formats, masking


@pytest.mark.parametrize("tokenizer", [DEMO_MODEL, GPT2_TOKENIZER], ids=["llama-sp", "gpt2-no-pad"])
def test_hh_plain_text_masking(tmp_path, tokenizer):
    """Labelled tokens decode to exactly the response + EOS; the prompt ids match in chosen and rejected."""
    manifest = tokenize(tmp_path / "out", f"{HH}:150", tokenizer=tokenizer, max_seq_length=4096)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    dialogues = {r["chosen"].strip() for r in hh_lines()}
    table = rows(tmp_path / "out")
    assert [r["index"] for r in table] == list(range(len(table)))
    assert manifest.stats["tokenizer_info"]["pad_token_id"] == tok.pad_token_id
    assert manifest.stats["chat_template"] is None
    for row in table:
        p = row["prompt_length"]
        assert row["chosen_input_ids"][:p] == row["rejected_input_ids"][:p]
        assert set(row["chosen_labels"][:p]) == {-100} and set(row["rejected_labels"][:p]) == {-100}
        assert row["chosen_length"] == len(row["chosen_input_ids"])
        for side in ("chosen", "rejected"):
            answer = labelled(row[f"{side}_input_ids"], row[f"{side}_labels"])
            assert answer[-1] == tok.eos_token_id and -100 not in answer
            assert answer == row[f"{side}_input_ids"][p:]
        # the whole sequence is the original dialogue, tokenized in one piece
        assert tok.decode(row["chosen_input_ids"], skip_special_tokens=True).strip() in dialogues
    assert len(table) == 150 - manifest.stats["dropped_total"]


def test_hh_response_text_roundtrip():
    """Decode the labelled part of one real HH pair and compare with the text after the last Assistant turn."""
    from dpo.pipeline.formats import normalise
    from dpo.pipeline.tokenization import EncodeSettings, PairEncoder

    record = hh_lines()[0]
    pair = normalise(record, "hh")
    for tokenizer in (DEMO_MODEL, GPT2_TOKENIZER):
        encoder = PairEncoder(EncodeSettings(str(tokenizer), None, False, 4096, None, "keep-start"))
        [enc] = encoder.encode([pair])
        tok = encoder.tokenizer
        assert enc.chosen[-1] == tok.eos_token_id
        assert tok.decode(enc.chosen[:-1]).strip() == pair.chosen.strip()
        assert tok.decode(enc.rejected[:-1]).strip() == pair.rejected.strip()
        assert tok.decode(enc.prompt, skip_special_tokens=True).strip() == pair.prompt.strip()
        # the ids are the tokenizer's own for the whole dialogue (BOS where the tokenizer adds one)
        assert enc.prompt + enc.chosen[:-1] == tok(record["chosen"])["input_ids"]


def test_sharegpt_chat_template_masking(tmp_path):
    manifest = tokenize(tmp_path / "out", f"{SHAREGPT}:60", max_seq_length=16384)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    records = json.loads(SHAREGPT_DATA.read_text())
    by_chosen = {r["chosen"]["value"].strip(): r for r in records}
    assert manifest.stats["chat_template"] == tok.chat_template
    assert manifest.stats["sources"][0]["format"] == "sharegpt"
    table = rows(tmp_path / "out")
    assert len(table) == 60
    for row in table:
        answer = labelled(row["chosen_input_ids"], row["chosen_labels"])
        assert answer[-1] == tok.eos_token_id  # the template's end of turn ends the response; its '\n' after it does not
        text = tok.decode(answer[:-1]).strip()
        assert text in by_chosen
        prompt = tok.decode(row["chosen_input_ids"][: row["prompt_length"]])
        assert prompt.endswith("assistant:")
        assert prompt.strip().startswith(("user:", "system:"))


def test_chat_format_and_chat_prompt_format(tmp_path):
    data = tmp_path / "chat.jsonl"
    chat = [{"role": "user", "content": "Name a colour."}]
    records = [
        {"chosen": chat + [{"role": "assistant", "content": "Blue."}],
         "rejected": chat + [{"role": "assistant", "content": "Seven."}]},
        {"chosen": chat + [{"role": "assistant", "content": "Red."}],
         "rejected": [{"role": "user", "content": "Other."}, {"role": "assistant", "content": "No."}]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompt_data = tmp_path / "prompt.json"
    prompt_data.write_text(json.dumps([{"prompt": chat, "chosen": "Blue.", "rejected": "Seven."}]))
    manifest = tokenize(tmp_path / "out", str(data), str(prompt_data))
    assert [s["format"] for s in manifest.stats["sources"]] == ["chat", "chat-prompt"]
    assert manifest.stats["dropped"] == {"prompts_differ": 1}
    first, second = rows(tmp_path / "out")
    # the same pair in two formats gives the same tokens
    assert {k: v for k, v in first.items() if k not in ("index", "source")} == \
        {k: v for k, v in second.items() if k not in ("index", "source")}
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert tok.decode(labelled(first["chosen_input_ids"], first["chosen_labels"])).strip() == "Blue.</s>"


def test_columns_mapping_parquet_and_saved_dataset(tmp_path):
    import datasets

    table = pa.table({"question": ["Why is the sky blue?", "2+2?"], "good": [" Rayleigh scattering.", " 4"],
                      "bad": [" Paint.", " 5"]})
    pq.write_table(table, tmp_path / "qa.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    columns = "prompt=question,chosen=good,rejected=bad"
    manifest = tokenize(tmp_path / "out", str(tmp_path / "qa.parquet"), str(tmp_path / "saved"), columns=columns)
    assert [s["format"] for s in manifest.stats["sources"]] == ["text", "text"]
    a, b, c, d = rows(tmp_path / "out")
    assert a["chosen_input_ids"] == c["chosen_input_ids"] and b["rejected_labels"] == d["rejected_labels"]
    assert a["chosen_input_ids"][0] == AutoTokenizer.from_pretrained(DEMO_MODEL).bos_token_id


def test_apply_chat_template_wraps_plain_pairs(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}) + "\n")
    manifest = tokenize(tmp_path / "out", str(data), apply_chat_template=True)
    [row] = rows(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    assert tok.decode(row["chosen_input_ids"]).strip() == "user: Say hi.\nassistant: Hi!</s>"
    assert manifest.stats["chat_template"] == tok.chat_template


def test_chat_data_needs_a_template(tmp_path):
    with pytest.raises(UsageError, match="no chat template; pass one with --chat-template"):
        tokenize(tmp_path / "out", f"{SHAREGPT}:5", tokenizer=GPT2_TOKENIZER)
    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    manifest = tokenize(tmp_path / "out", f"{SHAREGPT}:5", tokenizer=GPT2_TOKENIZER, chat_template=str(template),
                        max_seq_length=16384)
    assert manifest.stats["chat_template"] == template.read_text()
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    for row in rows(tmp_path / "out"):
        answer = labelled(row["rejected_input_ids"], row["rejected_labels"])
        assert answer[-1] == tok.eos_token_id
        assert tok.decode(row["rejected_input_ids"][: row["prompt_length"]]).endswith("<|assistant|>")


def test_token_merge_across_the_prompt_boundary_keeps_prompt_ids_and_response_text(tmp_path):
    """GPT-2's BPE joins "Q: " + "Yes" into "Q", ":", " Yes": the prompt's own ids must still lead."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "Q: is it blue? A: ", "chosen": "Yes it is.", "rejected": "No."}) + "\n"
        + json.dumps({"prompt": "<b>", "chosen": '"quoted"', "rejected": "plain"}) + "\n"
    )
    tokenize(tmp_path / "out", str(data), tokenizer=GPT2_TOKENIZER)
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    got = rows(tmp_path / "out")
    assert len(got) == 2
    for row, (prompt, chosen, rejected) in zip(got, [("Q: is it blue? A: ", "Yes it is.", "No."),
                                                      ("<b>", '"quoted"', "plain")]):
        n = row["prompt_length"]
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n] == tok(prompt)["input_ids"]
        assert tok.decode(labelled(row["chosen_input_ids"], row["chosen_labels"])) == chosen + tok.eos_token
        assert tok.decode(labelled(row["rejected_input_ids"], row["rejected_labels"])) == rejected + tok.eos_token


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_variants():
    """GPT-2's byte-level BPE as it ships (ByteLevel's own regex), and under Llama 3's Split pattern
    with Qwen2's NFC normaliser and added tokens that strip spaces or need a word: SplitPoints' kinds."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers

    gpt2 = AutoTokenizer.from_pretrained(GPT2_TOKENIZER).backend_tokenizer
    llama3 = AutoTokenizer.from_pretrained(GPT2_TOKENIZER).backend_tokenizer
    llama3.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    llama3.normalizer = normalizers.NFC()
    llama3.add_special_tokens([AddedToken("<|im_start|>", rstrip=True), AddedToken("<|end|>", lstrip=True),
                               AddedToken("zz", single_word=True, normalized=True)])
    return {"gpt2": gpt2, "llama3": llama3}


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_split_points_are_exact_where_they_are_taken(kind):
    """Where SplitPoints says a text splits at a position, the text's ids are the two parts' ids, on
    random texts of letters, digits, symbols, apostrophes, spaces, line breaks, accents (composing
    under NFC), no-break and other Unicode spaces, and added tokens around the junction."""
    import random

    from dpo.pipeline.tokenization import WHITESPACE, SplitPoints

    backend = byte_level_variants()[kind]
    points = SplitPoints.of(backend)
    assert points is not None
    alphabet = ["a", "b", "Z", "é", "e\u0301", "\u0301", "7", "12345", ".", ":", "'", "'s", "'ll", "?!", "-",
                " ", "  ", "\t", "\n", "\n\n", "\r\n", "\x1c", "\x1f", "<|endoftext|>",
                "<|im_start|>", "<|end|>", "zz", "Human:", " Assistant:", "\n\nHuman:", *sorted(WHITESPACE)]
    rng = random.Random(0)
    taken = 0
    for _ in range(8000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        response = rng.choice(sorted(WHITESPACE)) * rng.randint(0, 2) + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        text = prompt + response
        if not points.splits(text, len(prompt)):
            continue
        taken += 1
        whole, left, right = (e.ids for e in backend.encode_batch_fast([text, prompt, response], add_special_tokens=False))
        assert whole == left + right, (prompt, response)
    assert taken > 1000  # the check was put to the test, not just refused
    assert not points.splits("ab", 1) and not points.splits("a  b", 2) and not points.splits("a:\n b", 3)
    assert points.splits("a. \nb", 2) and points.splits("a.\nb", 2) == (kind == "gpt2")  # Llama 3: ".\n" is one piece


def test_split_points_are_not_claimed_for_other_tokenizers():
    """SentencePiece-style tokenizers prepend a space marker to a text's start, other patterns and
    normalisers may join across a space: those are tokenized whole."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from dpo.pipeline.tokenization import SplitPoints

    assert SplitPoints.of(AutoTokenizer.from_pretrained(DEMO_MODEL).backend_tokenizer) is None
    other = AutoTokenizer.from_pretrained(GPT2_TOKENIZER).backend_tokenizer
    other.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S+\s?"), "isolated")
    assert SplitPoints.of(other) is None
    other = AutoTokenizer.from_pretrained(GPT2_TOKENIZER).backend_tokenizer
    other.normalizer = normalizers.Lowercase()
    assert SplitPoints.of(other) is None
    other.normalizer = None
    other.pre_tokenizer = pre_tokenizers.Sequence([  # the Split would see ByteLevel's characters
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated")])
    assert SplitPoints.of(other) is None
    other.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert SplitPoints.of(other) is not None


def test_responses_tokenized_alone_give_the_whole_texts_ids(tmp_path, monkeypatch):
    """The stage's output with split points taken is byte for byte the output of tokenizing every
    conversation whole (real HH data, GPT-2's tokenizer; plain pairs and a chat template; long prompts
    losing their earliest turns)."""
    from dpo.pipeline.tokenization import SplitPoints

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    outputs = {}
    for taken in (True, False):
        if not taken:
            monkeypatch.setattr(SplitPoints, "of", classmethod(lambda cls, backend: None))
        for name, options in (("plain", {}), ("chat", {"apply_chat_template": True, "chat_template": str(template)})):
            out = tmp_path / f"{name}-{taken}"
            manifest = tokenize(out, f"{HH}:300", tokenizer=GPT2_TOKENIZER, max_seq_length=256, **options)
            assert manifest.stats["prompt_truncated"] > 30  # prompts lose turns: their turns are split points too
            outputs[name, taken] = shard_bytes(out)
    for name in ("plain", "chat"):
        assert outputs[name, True] == outputs[name, False]


def test_tokenizer_json_padding_and_truncation_do_not_reach_the_ids(tmp_path):
    """A tokenizer.json saved with padding or truncation switched on: the Rust tokenizer would pad or
    cut every text it encodes; dpo's lengths are its own options, so the ids are the plain ones."""
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    tok.save_pretrained(tmp_path / "configured")
    config = json.loads((tmp_path / "configured" / "tokenizer.json").read_text())
    config["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    config["padding"] = {"strategy": {"Fixed": 600}, "direction": "Right", "pad_to_multiple_of": None,
                         "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}
    (tmp_path / "configured" / "tokenizer.json").write_text(json.dumps(config))
    tokenize(tmp_path / "plain", f"{HH}:20", tokenizer=GPT2_TOKENIZER)
    tokenize(tmp_path / "configured-out", f"{HH}:20", tokenizer=tmp_path / "configured")
    assert rows(tmp_path / "configured-out") == rows(tmp_path / "plain")


def test_pair_whose_responses_agree_within_the_length_limit_is_dropped(tmp_path):
    """keep-start would leave chosen == rejected: a pair with no preference signal, so it is dropped."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "Once upon a time", "chosen": " there was a cat who sat on a mat all day long.",
                    "rejected": " there was a cat who ran away from home at night."}) + "\n"
        + json.dumps({"prompt": "Once upon a time", "chosen": " a dog barked.", "rejected": " the sun set."}) + "\n"
    )
    m = tokenize(tmp_path / "out", str(data), max_seq_length=12)
    assert m.stats["dropped"] == {"identical_after_truncation": 1}
    assert m.stats["pairs"]["train"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(1, "identical_after_truncation")]


def test_template_whose_prompt_is_not_a_token_prefix_is_reported(tmp_path):
    template = tmp_path / "broken.jinja"
    # the generation prompt says 'assistant:\n' but a rendered answer follows 'assistant: ' (no newline)
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"json, row \[\d+\]: the chat template's rendering of the prompt is not a prefix"):
        tokenize(tmp_path / "out", f"{SHAREGPT}:3", chat_template=str(template))
    assert not (tmp_path / "out" / "manifest.json").exists()
    # set aside one by one, but a source that loses every record beside another source is not left out silently
    with pytest.raises(DataError, match=r"--data .*json:3: none of its 3 records made a pair \(dropped: "
                                        r"\{'prompt_not_token_prefix': 3\}\): a whole source lost"):
        tokenize(tmp_path / "skip", f"{SHAREGPT}:3", f"{HH}:5", chat_template=str(template), on_bad_record="skip")
    assert not (tmp_path / "skip" / "manifest.json").exists()


CHAT = [{"chosen": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "no"}]} for i in range(3)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_template_that_does_not_compile_is_a_configuration_error(tmp_path):
    """Today every chat record became a template_error drop, silently so beside plain-text data."""
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }\n{% endfor %}")
    args = ["tokenize", "--data", data, "--data", f"{HH}:5", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"]
    assert_refused(args + ["--chat-template", template], f"--chat-template {template} does not compile: "
                   "TemplateSyntaxError at template line 1: unexpected '}'", out=tmp_path / "out",
                   inputs=[data, template])
    # the tokenizer folder's own template, named by the file that holds it
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        folder.joinpath(name).write_bytes((DEMO_MODEL / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    args[args.index("--tokenizer") + 1] = folder
    assert_refused(args, f"the chat template of --tokenizer {folder} ({folder / 'tokenizer_config.json'}) does not "
                   "compile: TemplateSyntaxError", out=tmp_path / "out", inputs=[data, folder])
    # a template nobody uses is nobody's problem: plain-text data tokenizes as before
    assert tokenize(tmp_path / "plain", f"{HH}:5", tokenizer=folder).stats["pairs"]["train"] == 5


def test_chat_template_that_fails_on_the_first_record_is_a_configuration_error(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('no user turns here') }}"
                        "{% endif %}{{ m.content }}{% endfor %}")
    assert_refused(["tokenize", "--data", f"{HH}:5", "--data", data, "--tokenizer", DEMO_MODEL, "--out",
                    tmp_path / "out", "--chat-template", template, "--on-bad-record", "skip"],
                   f"--chat-template {template} fails on the first chat record ({data}, line 1): TemplateError: "
                   "no user turns here", out=tmp_path / "out", inputs=[data, template])


def test_chat_template_that_refuses_a_later_record_drops_that_record(tmp_path):
    """The first conversation renders, a later one breaks the template's rule: a per-record drop, as before."""
    odd = {"chosen": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "no"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT[:2] + [odd])
    template = tmp_path / "alternate.jinja"
    template.write_text(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.role + ': ' + m.content }}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    manifest = tokenize(tmp_path / "out", str(data), chat_template=str(template))
    assert manifest.stats["pairs"]["train"] == 2
    assert manifest.stats["dropped"] == {"template_error": 1}


# --------------------------------------------------------------------------------- truncation


def test_truncation_keep_start_and_drop(tmp_path):
    # Without a prompt limit (0; the default limit keeps room for the responses, see the next test).
    tokenize(tmp_path / "full", f"{HH}:300", max_seq_length=4096, max_prompt_length=0)
    keep = tokenize(tmp_path / "keep", f"{HH}:300", max_seq_length=256, max_prompt_length=0)
    full = {(r["source"], tuple(r["chosen_input_ids"][: r["prompt_length"]])): r for r in rows(tmp_path / "full")}
    table = rows(tmp_path / "keep")
    assert keep.stats["truncated"] > 0
    assert keep.stats["dropped"].get("no_trainable_tokens", 0) > 0  # prompts of 256+ tokens leave no room
    for row in table:
        whole = full[(row["source"], tuple(row["chosen_input_ids"][: row["prompt_length"]]))]
        for side in ("chosen", "rejected"):
            assert row[f"{side}_length"] <= 256
            # keep-start: the prompt and the start of the response survive, the end is cut
            assert row[f"{side}_input_ids"] == whole[f"{side}_input_ids"][:256]
            assert row[f"{side}_labels"] == whole[f"{side}_labels"][:256]

    drop = tokenize(tmp_path / "drop", f"{HH}:300", max_seq_length=256, truncation="drop", max_prompt_length=0)
    assert drop.stats["truncated"] == 0
    assert drop.stats["dropped"]["too_long"] > 0
    assert max(max(r["chosen_length"], r["rejected_length"]) for r in rows(tmp_path / "drop")) <= 256
    assert drop.stats["pairs"]["train"] < keep.stats["pairs"]["train"]
    rejects = [json.loads(line) for line in (tmp_path / "drop" / "rejects.jsonl").read_text().splitlines()]
    assert sum(r["reason"] == "too_long" for r in rejects) == drop.stats["dropped"]["too_long"]


def _huge_pairs(size: int) -> list:
    """Pairs with texts far over the cut: prose with multi-byte characters, emoji and newlines, runs
    without whitespace, huge prompts (plain and chat, early and late turns) and huge responses."""
    import random

    from dpo.pipeline.formats import Pair

    rng = random.Random(0)
    words = "the cat sat héllo wörld 日本語 テスト 🙂🙃 42 3.14 , . ! ? \n\n - -- ### aaaa Assistant: </s>".split(" ")

    def prose(n: int) -> str:
        out, length = [], 0
        while length < n:
            out.append(rng.choice(words))
            length += len(out[-1]) + 1
        return " ".join(out)

    user = {"role": "user", "content": "hi"}
    return [
        Pair("Q: " + prose(40), " " + prose(size), " " + prose(size)),
        Pair(prose(size), " yes", " no"),
        Pair(prose(size), " " + prose(size), " " + prose(size)),
        Pair(" " + "a" * size, " " + "b" * size, " " + "c" * size),
        Pair(({"role": "system", "content": prose(size)}, user), prose(size), "no"),
        Pair(({"role": "user", "content": prose(size)},), "yes " + prose(size), "no"),
        Pair((user,), prose(size) + "</s>" + prose(size), "no"),
    ]


@pytest.mark.parametrize("tokenizer", [DEMO_MODEL, GPT2_TOKENIZER], ids=["llama-sp", "gpt2"])
def test_huge_texts_are_cut_before_tokenizing_and_keep_the_same_tokens(tokenizer, tmp_path, monkeypatch):
    """The cut (a text longer than (max_seq_length + margin) x the longest token's characters keeps its
    head as a response, its tail as a prompt) changes no token a pair keeps, nor why a pair is dropped.
    (Texts under 100,000 characters are never cut; here the floor is lowered to test the cut on small texts.)"""
    from dpo.pipeline import tokenization
    from dpo.pipeline.tokenization import EncodeSettings, PairEncoder

    monkeypatch.setattr(tokenization, "MIN_CUT_CHARS", 0)

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
                        "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    pairs = _huge_pairs(18_000)
    kept = 0
    for max_seq_length, max_prompt_length, truncation in [(64, None, "keep-start"), (64, 16, "keep-start"),
                                                          (64, None, "drop"), (72, 40, "keep-start")]:
        encoder = PairEncoder(EncodeSettings(str(tokenizer), template.read_text(), False, max_seq_length,
                                             max_prompt_length, truncation))
        assert all(encoder.bound(pair)[1] for pair in pairs)  # every one of them is cut
        bounded = encoder.encode(pairs)
        encoder.max_chars = None
        whole = encoder.encode(pairs)
        for got, expected in zip(bounded, whole):
            assert type(got) is type(expected)
            assert got == expected if not hasattr(got, "reason") else got.reason == expected.reason
        kept += sum(hasattr(r, "prompt") and r.truncated for r in whole)
    assert kept >= 10  # the comparison covers kept tokens, not only drops


def test_huge_text_cut_changes_no_byte_of_real_data(tmp_path, monkeypatch):
    """HH-RLHF at --max-seq-length 64 with the demo tokenizer, the 100,000-character floor lowered so
    that most dialogues are cut (at 896 characters): the shards are byte-identical to those made
    without the cut, and so are the drops. With the floor, no record of the shipped data is cut."""
    from dpo.pipeline import tokenization
    from dpo.pipeline.tokenization import PairEncoder

    options = dict(max_seq_length=64, max_prompt_length=24, rows_per_shard=200)
    with monkeypatch.context() as patch:
        patch.setattr(tokenization, "MIN_CUT_CHARS", 0)
        cut = tokenize(tmp_path / "cut", f"{HH}:400", **options)
    monkeypatch.setattr(PairEncoder, "bound", lambda self, pair: (pair, 0))
    whole = tokenize(tmp_path / "whole", f"{HH}:400", **options)
    assert cut.fingerprint == whole.fingerprint
    assert {k: v for k, v in shard_bytes(tmp_path / "cut").items() if k.endswith(".parquet")} == \
        {k: v for k, v in shard_bytes(tmp_path / "whole").items() if k.endswith(".parquet")}
    assert cut.stats["dropped"] == whole.stats["dropped"] and cut.stats["truncated"] == whole.stats["truncated"] > 300
    assert max(len(r["chosen"]) for r in hh_lines()) < tokenization.MIN_CUT_CHARS


def test_max_prompt_length_keeps_the_end_of_the_prompt(tmp_path):
    tokenize(tmp_path / "full", f"{HH}:50", max_seq_length=4096)
    tokenize(tmp_path / "cut", f"{HH}:50", max_seq_length=4096, max_prompt_length=64, prompt_truncation="tokens")
    for full, cut in zip(rows(tmp_path / "full"), rows(tmp_path / "cut")):
        p, q = full["prompt_length"], cut["prompt_length"]
        assert q == min(p, 64)
        assert cut["chosen_input_ids"][0] == 1  # BOS survives
        assert cut["chosen_input_ids"][1:q] == full["chosen_input_ids"][p - q + 1 : p]
        assert cut["chosen_input_ids"][q:] == full["chosen_input_ids"][p:]


# ----------------------------------------------------------------------------- mixing, splits


def test_mixing_fraction_count_seed_and_eval_split(tmp_path):
    m = tokenize(tmp_path / "a", f"{HH}:0.1", f"{SHAREGPT}:40", max_seq_length=16384, eval_fraction=0.2, seed=3)
    assert [s["records"] for s in m.stats["sources"]] == [231, 40]
    assert m.stats["records_read"] == 271
    train, evals = rows(tmp_path / "a"), rows(tmp_path / "a", "eval")
    assert m.stats["pairs"] == {"train": len(train), "eval": len(evals)}
    assert len(evals) in range(50, 56)  # 54 records held out before filtering, minus drops
    assert [r["index"] for r in train + evals] == list(range(len(train) + len(evals)))
    per_source = m.stats["pairs_per_source"]
    assert set(per_source["train"]) == {HH, SHAREGPT}
    assert per_source["train"][SHAREGPT] + per_source["eval"].get(SHAREGPT, 0) == 40

    again = tokenize(tmp_path / "b", f"{HH}:0.1", f"{SHAREGPT}:40", max_seq_length=16384, eval_fraction=0.2, seed=3)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert again.fingerprint == m.fingerprint
    other = tokenize(tmp_path / "c", f"{HH}:0.1", f"{SHAREGPT}:40", max_seq_length=16384, eval_fraction=0.2, seed=4)
    assert other.fingerprint != m.fingerprint
    assert [r["chosen_input_ids"] for r in rows(tmp_path / "c")] != [r["chosen_input_ids"] for r in train]


def test_eval_data_source(tmp_path):
    m = tokenize(tmp_path / "out", f"{HH}:100", eval_data=(f"{SHAREGPT}:10",), max_seq_length=16384)
    assert m.stats["pairs_per_source"]["eval"] == {SHAREGPT: 10}
    assert rows(tmp_path / "out", "eval")[0]["index"] == m.stats["pairs"]["train"]


def test_eval_split_asked_for_and_empty_is_refused_saying_why(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(20)])
    out = tmp_path / "out"
    base = ["tokenize", "--data", data, "--tokenizer", DEMO_MODEL, "--out", out]
    assert_refused(base + ["--eval-fraction", "0.01"], "--eval-fraction 0.01 holds out 0 of the 20 --data records, "
                   "so there would be no eval split", out=out, inputs=[data])
    assert_refused(base + ["--eval-fraction", "0.99"], "holds out 20 of the 20 --data records, leaving none to train on",
                   out=out, inputs=[data])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_refused(base + ["--eval-data", empty, "--format", "text"], f"--eval-data {empty}: has no records",
                   out=out, inputs=[data, empty])
    # every eval record dropped by the filters: refused after tokenizing, before anything is committed
    dropped = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "x", "chosen": "same", "rejected": "same"}] * 3)
    assert_refused(base + ["--eval-data", dropped], "the eval split asked for with --eval-data has no pairs left after "
                   "filtering: all 3 of its records were dropped ({'chosen_equals_rejected': 3})",
                   out=out, inputs=[data, dropped])


def test_eval_data_that_overlaps_the_train_data_needs_allow_overlap(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    # lines 2 and 3 repeat train pairs (key order does not matter: the normalised pair is compared)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"chosen": "a", "rejected": "c", "prompt": "q1"},
                                                  {"rejected": "b", "chosen": "a", "prompt": "q4"}, records[7]])
    args = ["tokenize", "--data", data, "--eval-data", evals, "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"]
    assert_refused(args, f"2 of the 3 --eval-data records are also train pairs (the same prompt, chosen and rejected), "
                   f"e.g. {evals}, line 2 is {data}, line 5", "--allow-overlap", out=tmp_path / "out", inputs=[data, evals])
    allowed = dpo_in_process(*args, "--allow-overlap", "--quiet")
    assert allowed.exit_code == 0, allowed.output
    assert "2 of the 3 --eval-data records are also train pairs" in allowed.output
    assert len(rows(tmp_path / "out", "eval")) == 3
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["allow_overlap"] is True
    # a permission, not a setting: without an overlap it changes nothing, not even the fingerprint
    apart = write_jsonl(tmp_path / "apart.jsonl", [{"prompt": "new", "chosen": "a", "rejected": "b"}])
    strict = tokenize(tmp_path / "strict", str(data), eval_data=(str(apart),))
    lenient = tokenize(tmp_path / "lenient", str(data), eval_data=(str(apart),), allow_overlap=True)
    assert strict.fingerprint == lenient.fingerprint
    assert shard_bytes(tmp_path / "strict") == shard_bytes(tmp_path / "lenient")
    # pairs held out by --eval-fraction are the train data's own records: not an overlap
    assert tokenize(tmp_path / "fraction", str(data), eval_fraction=0.2).stats["pairs"] == {"train": 8, "eval": 2}


# ------------------------------------------------------------------------ rejects, malformed data


def test_rejects_file_lists_every_drop_with_its_line(tmp_path):
    m = tokenize(tmp_path / "out", HH, max_seq_length=4096)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["line"], r["reason"]) for r in rejects} == {
        (87, "empty_response"), (517, "empty_response"), (926, "empty_response"), (1104, "empty_response"),
        (1255, "prompts_differ"), (1689, "prompts_differ"), (1951, "prompts_differ"),
        (1953, "prompts_differ"), (2037, "prompts_differ")}
    assert all(r["file"] == HH and r["source"] == HH and r["split"] == "train" for r in rejects)
    assert m.stats["dropped"] == {"empty_response": 4, "prompts_differ": 5}
    assert m.stats["pairs"]["train"] == 2312 - 9
    entry = next(f for f in m.files if f.path == "rejects.jsonl")
    assert entry.rows == 9


MALFORMED = {
    "bad-json": ('{"prompt": "q", "chosen": "a", "rejected": "b"', "line 2", "not valid JSON"),
    "missing-field": ('{"prompt": "q", "chosen": "a"}', "line 2", "'rejected': missing"),
    "wrong-type": ('{"prompt": "q", "chosen": ["a"], "rejected": "b"}', "line 2", "'chosen': expected a string, got list"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_record_stops_with_file_line_field(tmp_path, kind):
    line, where, what = MALFORMED[kind]
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    data.write_text(f"{good}\n{line}\n{good}\n")
    proc = run_dpo("tokenize", "--data", data, "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out", "--format", "text")
    assert proc.returncode == 2, proc.stderr
    assert f"{data}, {where}" in proc.stderr and what in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert list((tmp_path / "out").glob("train/*.parquet")) == []


def test_malformed_records_skipped_into_rejects(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    data.write_text("\n".join([good] + [m[0] for m in MALFORMED.values()] + [good]) + "\n")
    m = tokenize(tmp_path / "out", str(data), format="text", on_bad_record="skip")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "malformed"), (3, "malformed"), (4, "malformed")]
    assert "'chosen': expected a string" in rejects[2]["detail"]
    assert m.stats["pairs"]["train"] == 2 and m.stats["dropped"] == {"malformed": 3}


def test_text_tokenizers_cannot_take_is_a_bad_record_at_its_line(tmp_path):
    """Bytes that are not UTF-8 (was: the whole file refused at a byte offset) and lone surrogates
    from JSON escapes (was: a crash inside the Rust tokenizer): bad records naming file and line."""
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode()
    lines = [good, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', b'{"prompt": "q", "chosen": "a\\ud800",'
             b' "rejected": "b"}', good]
    plain = tmp_path / "pairs.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    packed = tmp_path / "pairs.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for data in (plain, packed):
        args = ["tokenize", "--data", data, "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"]
        assert_refused(args, f"{data}, line 2: not UTF-8 text (byte 0xe9 at byte 16 of the line)",
                       "--on-bad-record skip", out=tmp_path / "out", inputs=[data])
        m = tokenize(tmp_path / f"skip-{data.name}", str(data), on_bad_record="skip")
        rejects = [json.loads(line) for line in (tmp_path / f"skip-{data.name}" / "rejects.jsonl").read_text().splitlines()]
        assert [(r["line"], r["reason"]) for r in rejects] == [(2, "malformed"), (3, "malformed")]
        assert "field 'chosen': holds U+D800 at character 1, a lone surrogate" in rejects[1]["detail"]
        assert m.stats["pairs"]["train"] == 2
    # the surrogate alone, in error mode: its line and field
    (tmp_path / "surrogate.jsonl").write_bytes(lines[2] + b"\n")
    assert_refused(["tokenize", "--data", tmp_path / "surrogate.jsonl", "--tokenizer", DEMO_MODEL, "--out",
                    tmp_path / "out"], "surrogate.jsonl, line 1: field 'chosen': holds U+D800",
                   out=tmp_path / "out", inputs=[tmp_path / "surrogate.jsonl"])
    # a JSON list is one document: a byte that is not UTF-8 inside a string is a bad record at its row and field
    listed = tmp_path / "pairs.json"
    listed.write_bytes(b"[" + good + b", " + lines[1] + b"]")
    with pytest.raises(DataError, match=r"pairs\.json, row \[1\]: field 'prompt': holds U\+DCE9 at character 3"):
        tokenize(tmp_path / "out", str(listed))
    assert tokenize(tmp_path / "skip-list", str(listed), on_bad_record="skip").stats["dropped"] == {"malformed": 1}


def test_byte_order_marks(tmp_path):
    """A UTF-8 BOM at the start of a file is an encoding marker: skipped, the output is the file's without it.
    Anywhere else U+FEFF is a character; a UTF-16 file is refused as a whole."""
    records = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "\ufeffq2", "chosen": "a", "rejected": "b"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (tmp_path / "plain.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "marked.jsonl").write_text(text, encoding="utf-8-sig")
    plain = tokenize(tmp_path / "a", str(tmp_path / "plain.jsonl"))
    marked = tokenize(tmp_path / "b", str(tmp_path / "marked.jsonl"))
    assert plain.stats["pairs"]["train"] == marked.stats["pairs"]["train"] == 2
    assert [r["chosen_input_ids"] for r in rows(tmp_path / "a")] == [r["chosen_input_ids"] for r in rows(tmp_path / "b")]
    first, second = rows(tmp_path / "a")
    assert second["prompt_length"] > first["prompt_length"]  # the U+FEFF inside a string is kept as text
    listed = tmp_path / "marked.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert tokenize(tmp_path / "c", str(listed)).stats["pairs"]["train"] == 2
    # a BOM before a later line (files concatenated with cat) is not JSON: a bad record at that line
    (tmp_path / "joined.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\xef\xbb\xbf" + text.encode())
    assert_refused(["tokenize", "--data", tmp_path / "joined.jsonl", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"],
                   "joined.jsonl, line 3: not valid JSON (Unexpected UTF-8 BOM", out=tmp_path / "out",
                   inputs=[tmp_path / "joined.jsonl"])
    (tmp_path / "wide.jsonl").write_text(text, encoding="utf-16")
    assert_refused(["tokenize", "--data", tmp_path / "wide.jsonl", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"],
                   "wide.jsonl: starts with a UTF-16 byte-order mark", out=tmp_path / "out", inputs=[tmp_path / "wide.jsonl"])


def test_chat_message_with_an_unknown_role_is_a_bad_record(tmp_path):
    bad = {"chosen": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "no"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [bad] + CHAT)
    assert_refused(["tokenize", "--data", data, "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"],
                   f"{data}, line 1: field 'chosen[0].role': unknown role 'human' (known: system, developer, user",
                   out=tmp_path / "out", inputs=[data])
    # skipped, even as the first record: the format is judged from the first record that can be judged
    m = tokenize(tmp_path / "skip", str(data), on_bad_record="skip")
    assert m.stats["dropped"] == {"malformed": 1} and m.stats["pairs"]["train"] == 3
    first_bad = tmp_path / "first.jsonl"
    first_bad.write_text("not json\n" + "".join(json.dumps(r) + "\n" for r in CHAT))
    assert tokenize(tmp_path / "skip2", str(first_bad), on_bad_record="skip").stats["dropped"] == {"malformed": 1}


def test_malformed_json_list_names_the_element(tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": 1, "rejected": "b"}]))
    with pytest.raises(DataError, match=r"pairs\.json, row \[1\]: field 'chosen': expected a string, got int"):
        tokenize(tmp_path / "out", str(data))


def test_bad_amount_is_refused_as_an_amount_and_colon_names_work(tmp_path):
    data = tmp_path / "run:2024.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(4)))
    assert_refused(["tokenize", "--data", f"{data}:1e3", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out"],
                   f"--data {data}:1e3: the amount '1e3' after the last ':' is not one dpo takes",
                   out=tmp_path / "out", inputs=[data])
    assert_refused(["tokenize", "--data", f"{HH}:10", "--eval-data", f"{data}:0.1", "--tokenizer", DEMO_MODEL,
                    "--out", tmp_path / "out"],
                   f"--eval-data {data}:0.1: takes no rows (0.1 of 4 rounds to 0)", out=tmp_path / "out", inputs=[data])
    assert tokenize(tmp_path / "whole", str(data)).stats["pairs"]["train"] == 4
    assert tokenize(tmp_path / "half", f"{data}:0.5").stats["pairs"]["train"] == 2


def test_hub_name_fails_clearly_offline(tmp_path):
    proc = run_dpo("tokenize", "--data", "some-org/some-dataset", "--tokenizer", DEMO_MODEL, "--out", tmp_path / "out",
                   env=dpo_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2
    assert "not a local file or folder, and loading it as a Hugging Face hub dataset failed" in proc.stderr


# ------------------------------------------------------------------------ reruns, lock, fingerprint


def test_noop_rerun_fingerprint_change_and_overwrite(tmp_path):
    out = tmp_path / "out"
    first = tokenize(out, f"{HH}:50")
    before = shard_bytes(out)
    again = run_dpo("tokenize", "--data", f"{HH}:50", "--tokenizer", DEMO_MODEL, "--out", out, "--num-proc", "2")
    assert again.returncode == 0 and "nothing to do" in again.stderr and first.fingerprint in again.stderr
    assert shard_bytes(out) == before
    with pytest.raises(ArtifactError, match="--overwrite") as err:
        tokenize(out, f"{HH}:50", max_seq_length=128)
    assert err.value.exit_code == 3
    assert shard_bytes(out) == before
    replaced = tokenize(out, f"{HH}:50", max_seq_length=128, overwrite=True)
    assert replaced.fingerprint != first.fingerprint
    assert json.loads((out / "manifest.json").read_text())["config"]["max_seq_length"] == 128


def test_lock_held_by_a_live_job(tmp_path):
    out = tmp_path / "out"
    with ArtifactLock(out, timeout_s=600):
        proc = run_dpo("tokenize", "--data", f"{HH}:10", "--tokenizer", DEMO_MODEL, "--out", out)
    assert proc.returncode == 4
    assert "being written by another job" in proc.stderr and f"pid {os.getpid()}" in proc.stderr


def test_fingerprint_is_pinned_and_ignores_non_semantic_options():
    cfg = TokenizeConfig(data=("pairs.jsonl:0.5",), tokenizer="tok", out="out")
    inputs = ["0" * 64, "dd5de5ed7a1c485f"]
    fp = fingerprint("tokenize", TOKENIZE_VERSION, semantic_config(cfg), inputs)
    # The default prompt limit (half of --max-seq-length, cut at turns) changed it from "17e853338a3a93d2",
    # which a run without a prompt limit keeps: its output is what the old default made.
    assert fp == "ce7ac845cfae689e"
    unlimited = TokenizeConfig(data=("pairs.jsonl:0.5",), tokenizer="tok", out="out", max_prompt_length=0)
    assert fingerprint("tokenize", TOKENIZE_VERSION, semantic_config(unlimited), inputs) == "17e853338a3a93d2"
    explicit = TokenizeConfig(data=("pairs.jsonl:0.5",), tokenizer="tok", out="out", max_prompt_length=512)
    assert fingerprint("tokenize", TOKENIZE_VERSION, semantic_config(explicit), inputs) == fp
    same = TokenizeConfig(data=("/moved/pairs.jsonl:0.5",), tokenizer="/elsewhere/tok", out="other", num_proc=8,
                          quiet=True, lock_timeout=5, overwrite=True)
    assert fingerprint("tokenize", TOKENIZE_VERSION, semantic_config(same), inputs) == fp
    for other in (dict(max_seq_length=512), dict(prompt_truncation="tokens")):
        changed = TokenizeConfig(data=("pairs.jsonl:0.5",), tokenizer="tok", out="out", **other)
        assert fingerprint("tokenize", TOKENIZE_VERSION, semantic_config(changed), inputs) != fp


def test_same_data_at_another_path_is_the_same_artifact(tmp_path):
    import shutil

    moved = tmp_path / "moved.jsonl.gz"
    shutil.copy(HH, moved)
    first = tokenize(tmp_path / "a", f"{HH}:20")
    second = tokenize(tmp_path / "b", f"{moved}:20")
    assert first.fingerprint == second.fingerprint
    assert [r["chosen_input_ids"] for r in rows(tmp_path / "a")] == [r["chosen_input_ids"] for r in rows(tmp_path / "b")]
    assert tokenize(tmp_path / "c", f"{moved}:21").fingerprint != first.fingerprint


def test_tokenizer_fingerprint_is_content_based(tmp_path):
    import shutil

    from dpo.pipeline.tokenization import tokenizer_fingerprint

    assert tokenizer_fingerprint(str(DEMO_MODEL)) == "dd5de5ed7a1c485f"
    copy = shutil.copytree(DEMO_MODEL, tmp_path / "copy")
    assert tokenizer_fingerprint(str(copy)) == "dd5de5ed7a1c485f"
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_fingerprint(str(copy)) != "dd5de5ed7a1c485f"


# ------------------------------------------------------------------ parallelism and resume


def test_num_proc_gives_byte_identical_shards(tmp_path):
    common = dict(max_seq_length=512, rows_per_shard=150, eval_fraction=0.1)
    one = tokenize(tmp_path / "one", f"{HH}:400", f"{SHAREGPT}:100", num_proc=1, **common)
    two = tokenize(tmp_path / "two", f"{HH}:400", f"{SHAREGPT}:100", num_proc=2, **common)
    assert one.fingerprint == two.fingerprint
    assert len([f for f in one.files if f.path.endswith(".parquet")]) == 4  # 450 train + 50 eval records
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert [f.sha256 for f in one.files] == [f.sha256 for f in two.files]


@pytest.mark.slow
def test_sigkill_and_rerun_is_byte_identical(tmp_path):
    args = ["tokenize", "--data", HH, "--tokenizer", str(DEMO_MODEL), "--rows-per-shard", "100", "--max-seq-length", "512"]
    reference = tmp_path / "reference"
    run_dpo(*args, "--out", reference, check=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen([*DPO, *args, "--out", str(out)], env=dpo_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / "train").glob("part-*.parquet"))) < 5:
        assert proc.poll() is None, "finished before it could be killed: use smaller shards"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    committed = len(list((out / "train").glob("part-*.parquet")))
    assert 5 <= committed < 24

    time.sleep(1.5)  # the dead job's lock goes stale after --lock-timeout, as after a requeue
    rerun = run_dpo(*args, "--out", out, "--lock-timeout", "1", check=True)
    assert "resuming" in rerun.stderr and "already committed" in rerun.stderr
    assert shard_bytes(out) == shard_bytes(reference)
    assert json.loads((out / "manifest.json").read_text())["stats"]["pairs"] == \
        json.loads((reference / "manifest.json").read_text())["stats"]["pairs"]
    assert not (out / ".rejects").exists()


def test_a_shard_whose_arrow_copy_an_earlier_version_wrote_is_redone_on_resume(tmp_path):
    """Earlier versions' copies held the label columns; a partial run of one, resumed by this version,
    gets every copy rewritten that does not hold this version's columns, so the split reads as one table."""
    args = ["tokenize", "--data", HH, "--tokenizer", str(DEMO_MODEL), "--rows-per-shard", "100", "--max-seq-length", "512"]
    reference = tmp_path / "reference"
    run_dpo(*args, "--out", reference, check=True)
    out = tmp_path / "partial"
    killed = run_dpo(*args, "--out", out, env=dpo_env(DPO_TEST_FAULT="shard-write:4"))
    assert killed.returncode != 0 and not (out / "manifest.json").exists()
    old = out / "train" / "part-00001-of-00024.arrow"
    whole = pq.read_table(out / "train" / "part-00001-of-00024.parquet")
    with pa.ipc.new_file(old, whole.schema) as writer:  # a copy as an earlier version wrote it
        writer.write_table(whole)
    time.sleep(1.5)
    run_dpo(*args, "--out", out, "--lock-timeout", "1", check=True)
    assert shard_bytes(out) == shard_bytes(reference)
    assert "chosen_labels" not in ArtifactReader(out, kind="tokenized").read_split("train").column_names


# ------------------------------------------------------------------ prompt limit by default, at turns


def test_prompt_over_the_limit_loses_its_earliest_turns():
    """--prompt-truncation turns: the fewest earliest turns are left out (HH '\\n\\nHuman:' turns; chat
    turns from a user message, the system message kept); a prompt without turns, or whose last turn
    alone is too long, keeps its latest tokens, as --prompt-truncation tokens does."""
    from dpo.pipeline.formats import Pair
    from dpo.pipeline.tokenization import EncodeSettings, PairEncoder

    def encoder(limit, mode):
        return PairEncoder(EncodeSettings(str(DEMO_MODEL), None, False, 96, limit, "keep-start", prompt_truncation=mode))

    turns, tokens, whole = encoder(40, "turns"), encoder(40, "tokens"), encoder(None, "turns")
    story = "once upon a time there was a very long story about a cat " * 3
    hh = Pair(f"\n\nHuman: {story}\n\nAssistant: {story}\n\nHuman: what now?\n\nAssistant:", " a reply", " another")
    chat = Pair(({"role": "system", "content": "be kind"}, {"role": "user", "content": story},
                 {"role": "assistant", "content": story}, {"role": "user", "content": "what now?"}), "a reply", "b")
    kept = [Pair("\n\nHuman: what now?\n\nAssistant:", " a reply", " another"),
            Pair((chat.prompt[0], chat.prompt[3]), "a reply", "b")]
    for pair, expected in zip((hh, chat), kept):
        got, reference = turns.encode([pair])[0], whole.encode([expected])[0]
        assert got.prompt_truncated and not reference.prompt_truncated
        assert (got.prompt, got.chosen, got.rejected) == (reference.prompt, reference.chosen, reference.rejected)
        assert whole.encode([pair])[0].reason == "no_trainable_tokens"  # without a limit the pair is lost
    no_turns = Pair(story * 2, " a reply", " another")
    last_turn_too_long = Pair(f"\n\nHuman: {story}\n\nAssistant: ok\n\nHuman: {story}\n\nAssistant:", " a", " b")
    for pair in (no_turns, last_turn_too_long):
        got = turns.encode([pair])[0]
        assert got == tokens.encode([pair])[0] and got.prompt_truncated and len(got.prompt) == 40


def test_default_prompt_limit_keeps_the_pairs_a_long_prompt_used_to_drop(tmp_path, caplog):
    """With the defaults a prompt gets at most half of --max-seq-length, so no pair loses its
    responses to it; 0 turns the limit off (the old default), and its drops are warned about with the
    option that keeps them, in the log and the manifest."""
    caplog.set_level("WARNING", logger="dpo.tokenize")
    unlimited = tokenize(tmp_path / "unlimited", f"{HH}:300", max_seq_length=128, max_prompt_length=0)
    lost = unlimited.stats["dropped"]["no_trainable_tokens"]
    assert lost > 150
    assert unlimited.config["max_prompt_length"] == 0 and unlimited.stats["prompt_truncated"] == 0
    [dropped_warning] = [w for w in unlimited.stats["warnings"] if "dropped" in w]
    assert f"no_trainable_tokens {lost}: --max-prompt-length leaves the responses room" in dropped_warning
    assert dropped_warning in caplog.text

    m = tokenize(tmp_path / "default", f"{HH}:300", max_seq_length=128)
    assert m.config["max_prompt_length"] == 64
    assert "no_trainable_tokens" not in m.stats["dropped"]
    assert m.stats["pairs"]["train"] == unlimited.stats["pairs"]["train"] + lost
    table = rows(tmp_path / "default")
    assert max(r["prompt_length"] for r in table) <= 64
    assert m.stats["prompt_truncated"] == sum(r["prompt_length"] < full for r, full in zip(
        table, _prompt_lengths(tmp_path / "full", f"{HH}:300")))
    assert any("had their prompts cut to --max-prompt-length" in w for w in m.stats["warnings"])
    assert not any("dropped" in w for w in m.stats["warnings"])  # 3 of 300 records (1%): under the threshold


def _prompt_lengths(out: Path, data: str) -> list[int]:
    tokenize(out, data, max_seq_length=4096, max_prompt_length=0)
    return [r["prompt_length"] for r in rows(out)]


# ------------------------------------------------------------------ splits of saved DatasetDicts and hub datasets


def _hh_dataset_dict(root: Path, **splits: slice) -> None:
    import datasets

    lines = hh_lines()
    datasets.DatasetDict({name: datasets.Dataset.from_list(lines[part]) for name, part in splits.items()}).save_to_disk(
        str(root))


def test_saved_dataset_dict_by_split_end_to_end(tmp_path):
    """`dpo tokenize` on a DatasetDict folder: --data reads train, --eval-data the test split; sources
    are named with their split in rows, stats and lineage, and the split is in the fingerprint."""
    root = tmp_path / "hh"
    _hh_dataset_dict(root, train=slice(0, 40), test=slice(40, 52), test_other=slice(52, 60))
    result = dpo_in_process("tokenize", "--data", f"{root}:30", "--eval-data", f"{root}#test", "--tokenizer",
                            DEMO_MODEL, "--out", tmp_path / "a", "--max-seq-length", "256")
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["stats"]["records_read"] == 42
    assert set(m["stats"]["pairs_per_source"]["train"]) == {f"{root}#train"}
    assert set(m["stats"]["pairs_per_source"]["eval"]) == {f"{root}#test"}
    assert [i["path"] for i in m["inputs"] if i["kind"] == "data"] == [f"{root}:30", f"{root}#test"]
    assert {r["source"] for r in rows(tmp_path / "a", "eval")} == {f"{root}#test"}
    # the eval rows are the test split's dialogues, tokenized
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    first = rows(tmp_path / "a", "eval")[0]
    assert tok.decode(first["chosen_input_ids"], skip_special_tokens=True).strip() == hh_lines()[40]["chosen"].strip()

    assert_refused(["tokenize", "--data", f"{root}#train", "--eval-data", str(root), "--tokenizer", DEMO_MODEL,
                    "--out", tmp_path / "b"], f"--eval-data {root}: name the eval split, e.g. --eval-data {root}#test: "
                   "it has 2 test-like splits (test, test_other)", out=tmp_path / "b", inputs=[root])

    train = tokenize(tmp_path / "train", f"{root}#train:12")
    other = tokenize(tmp_path / "other", f"{root}#test_other")
    test = tokenize(tmp_path / "test", f"{root}#test:8")
    assert len({train.fingerprint, other.fingerprint, test.fingerprint}) == 3


def test_hub_dataset_config_and_split_reach_load_dataset(tmp_path, monkeypatch):
    """No network here: datasets.load_dataset is replaced, and it must be asked for the config and
    split each --data / --eval-data names (train by default; for --eval-data the one test-like split)."""
    import datasets

    from dpo.pipeline import sources

    lines = hh_lines()
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        start = {"train_prefs": 0, "train": 0, "test_prefs": 100, "test": 100}[split]
        return datasets.Dataset.from_list(lines[start : start + 20])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names",
                        lambda name, config=None: ["train_prefs", "test_prefs", "train_gen"])
    sources._load_hub.cache_clear()
    m = tokenize(tmp_path / "a", "HuggingFaceH4/ultrafeedback_binarized#train_prefs:10",
                 eval_data=("HuggingFaceH4/ultrafeedback_binarized",))
    assert set(calls) == {("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
                          ("HuggingFaceH4/ultrafeedback_binarized", None, "test_prefs")}
    assert set(m.stats["pairs_per_source"]["eval"]) == {"HuggingFaceH4/ultrafeedback_binarized#test_prefs"}
    calls.clear()
    other = tokenize(tmp_path / "b", "org/arc#ARC-Easy/test:10", "org/plain:5")
    assert set(calls) == {("org/arc", "ARC-Easy", "test"), ("org/plain", None, "train")}
    assert set(other.stats["pairs_per_source"]["train"]) == {"org/arc#ARC-Easy/test", "org/plain#train"}
    assert other.fingerprint != tokenize(tmp_path / "c", "org/arc#ARC-Easy/train:10", "org/plain:5").fingerprint
    sources._load_hub.cache_clear()
