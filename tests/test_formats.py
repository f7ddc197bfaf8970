"""Record formats, sources and sampling: detection, normalisation, drops, malformed fields."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from dpo.artifacts.errors import UsageError
from dpo.pipeline.formats import (
    Drop, FieldError, Pair, apply_columns, detect_format, normalise, parse_columns,
)
from dpo.pipeline.sources import SourceSpec, pick_fraction, resolve_source, sample_rows

from conftest import HH_DATA, SHAREGPT_DATA


def hh_records() -> list[dict]:
    with gzip.open(HH_DATA, "rt") as f:
        return [json.loads(line) for line in f]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_text_format():
    record = {"prompt": "Q?", "chosen": " good", "rejected": " bad", "extra": 1}
    assert detect_format(record) == "text"
    assert normalise(record, "text") == Pair("Q?", " good", " bad")


def test_chat_format_shares_prompt_turns_and_ignores_string_prompt():
    record = {  # UltraFeedback-binarized: a string prompt that repeats the first user turn
        "prompt": "hi",
        "chosen": [user("hi"), assistant("hello"), user("more"), assistant("sure")],
        "rejected": [user("hi"), assistant("hello"), user("more"), assistant("no")],
    }
    assert detect_format(record) == "chat"
    pair = normalise(record, "chat")
    assert pair == Pair((user("hi"), assistant("hello"), user("more")), "sure", "no")
    assert pair.is_chat
    record["rejected"][1] = assistant("HELLO")
    assert normalise(record, "chat").reason == "prompts_differ"


def test_chat_format_last_turn_must_be_assistant():
    record = {"chosen": [user("a"), assistant("b")], "rejected": [user("a")]}
    with pytest.raises(FieldError) as err:
        normalise(record, "chat")
    assert err.value.field == "rejected[0].role"


def test_chat_prompt_format_with_strings_and_lists():
    record = {"prompt": [user("hi")], "chosen": "yes", "rejected": "no"}
    assert detect_format(record) == "chat-prompt"
    assert normalise(record, "chat-prompt") == Pair((user("hi"),), "yes", "no")
    record = {"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")]}
    assert normalise(record, "chat-prompt") == Pair((user("hi"),), "yes", "no")


def test_hh_real_records_split_at_last_assistant_turn():
    records = hh_records()
    assert len(records) == 2312
    assert detect_format(records[0]) == "hh"
    pair = normalise(records[0], "hh")
    assert pair.prompt.startswith("\n\nHuman: what are some pranks with a pen")
    assert pair.prompt.endswith("\n\nAssistant:")
    assert records[0]["chosen"] == pair.prompt + pair.chosen
    assert records[0]["rejected"] == pair.prompt + pair.rejected
    assert "\n\nAssistant:" not in pair.chosen
    outcomes = [normalise(r, "hh") for r in records]
    drops = {i + 1: o.reason for i, o in enumerate(outcomes) if isinstance(o, Drop)}
    # The real file: five dialogues whose last split points differ, four with an empty chosen answer.
    assert drops == {87: "empty_response", 517: "empty_response", 926: "empty_response", 1104: "empty_response",
                     1255: "prompts_differ", 1689: "prompts_differ", 1951: "prompts_differ",
                     1953: "prompts_differ", 2037: "prompts_differ"}


def test_sharegpt_real_records():
    records = json.loads(SHAREGPT_DATA.read_text())
    assert detect_format(records[0]) == "sharegpt"
    pairs = [normalise(r, "sharegpt") for r in records]
    assert all(isinstance(p, Pair) for p in pairs)
    first = pairs[0]
    assert first.prompt == ({"role": "user", "content": records[0]["conversations"][0]["value"]},)
    assert first.chosen == records[0]["chosen"]["value"]
    with_system = next(p for p, r in zip(pairs, records) if any(t["from"] == "system" for t in r["conversations"]))
    assert with_system.prompt[0]["role"] == "system"


def test_sharegpt_unknown_speaker_names_the_field():
    record = {"conversations": [{"from": "narrator", "value": "x"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}}
    with pytest.raises(FieldError) as err:
        normalise(record, "sharegpt")
    assert err.value.field == "conversations[0].from"


def test_chat_roles_and_text_tokenizers_cannot_take_name_the_field():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(FieldError, match=r"'prompt\[0\].role': unknown role 'User' \(known: system, developer, user"):
        normalise({"prompt": [{"role": "User", "content": "hi"}], "chosen": "a", "rejected": "b"}, "chat-prompt")
    lone = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "o\udcffk"}]
    with pytest.raises(FieldError, match=r"'rejected\[1\].content': holds U\+DCFF at character 1, a lone surrogate"):
        normalise({"chosen": turns, "rejected": lone}, "chat")
    with pytest.raises(FieldError, match=r"'chosen': holds U\+D83D at character 10"):
        normalise({"chosen": "\n\nHuman: h\ud83d\n\nAssistant: a", "rejected": "\n\nHuman: h\ud83d\n\nAssistant: b"}, "hh")
    with pytest.raises(FieldError, match=r"'system': holds U\+DC00"):
        normalise({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                   "rejected": {"from": "gpt", "value": "b"}, "system": "s\udc00"}, "sharegpt")
    # a surrogate pair from JSON escapes is one character, not a problem
    assert normalise(json.loads('{"prompt": "\\ud83d\\ude00", "chosen": "a", "rejected": "b"}'), "text").prompt == "\U0001F600"


def test_columns_mapping():
    assert parse_columns("prompt=question, chosen=good,rejected=bad") == {
        "prompt": "question", "chosen": "good", "rejected": "bad"}
    record = apply_columns({"question": "Q", "good": "A", "bad": "B"}, parse_columns("prompt=question,chosen=good,rejected=bad"))
    assert detect_format(record) == "text"
    assert normalise(record, "text") == Pair("Q", "A", "B")
    with pytest.raises(FieldError) as err:
        apply_columns({"question": "Q"}, {"prompt": "question", "chosen": "good"})
    assert err.value.field == "good"
    for bad in ("prompt", "answer=x", "prompt="):
        with pytest.raises(UsageError):
            parse_columns(bad)


@pytest.mark.parametrize("record, field", [
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen"),
])
def test_text_malformed_fields(record, field):
    with pytest.raises(FieldError) as err:
        normalise(record, "text")
    assert err.value.field == field


def test_message_field_paths():
    record = {"chosen": [user("a"), {"role": "assistant", "content": 5}], "rejected": [user("a"), assistant("b")]}
    with pytest.raises(FieldError) as err:
        normalise(record, "chat")
    assert err.value.field == "chosen[1].content"
    assert "expected a string, got int" in str(err.value)


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "  \n", "chosen": "a", "rejected": "b"}, "empty_prompt"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "empty_response"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected"),
])
def test_content_drops(record, reason):
    assert normalise(record, "text").reason == reason


def test_undetectable_format_is_a_usage_error():
    with pytest.raises(UsageError, match="--format"):
        detect_format({"question": "q", "answer": "a"})


def test_source_spec_amounts():
    assert SourceSpec.parse("data.jsonl") == SourceSpec("data.jsonl", "data.jsonl", None)
    assert SourceSpec.parse("data.jsonl:0.5").amount == 0.5
    assert SourceSpec.parse("data.jsonl:1000").amount == 1000
    assert SourceSpec.parse("data.jsonl:1.0").amount is None
    assert SourceSpec.parse("org/name:.25") == SourceSpec("org/name:.25", "org/name", 0.25)
    for bad in ("x:0", "x:1.5", "x:0.0"):
        with pytest.raises(UsageError):
            SourceSpec.parse(bad)


def test_bad_amount_is_named_as_the_amount(tmp_path):
    """Today's "no such file" for data.jsonl:abc hid the real mistake: the amount."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    for amount in ("abc", "-5", "1e3", "50%", "1,000", "", "0.5.1"):
        with pytest.raises(UsageError, match=f"the amount '{re.escape(amount)}' after the last ':' is not one dpo takes; "
                                             "AMOUNT is a row count"):
            SourceSpec.parse(f"{data}:{amount}")
    # the amount is judged even when the file is missing, if the name says it is a data file
    with pytest.raises(UsageError, match="the amount 'x'"):
        SourceSpec.parse(str(tmp_path / "missing.jsonl:x"))
    with pytest.raises(UsageError, match=r"--eval-data .*: a fraction must be in \(0, 1\], got 1.5"):
        SourceSpec.parse(f"{data}:1.5", "--eval-data")


def test_file_names_with_colons(tmp_path):
    odd = tmp_path / "run:2024-01-01.jsonl"
    odd.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert SourceSpec.parse(str(odd)) == SourceSpec(str(odd), str(odd), None)
    assert SourceSpec.parse(f"{odd}:0.5") == SourceSpec(f"{odd}:0.5", str(odd), 0.5)
    assert SourceSpec.parse(f"{odd}:7").amount == 7
    # a name that ends in ':DIGITS' is read whole when only that file exists ...
    numbered = tmp_path / "pairs:100"
    numbered.write_text("")
    assert SourceSpec.parse(str(numbered)).path == str(numbered)
    # ... and the amount reading wins when both exist; ':1.0' then takes the whole of the odd one
    (tmp_path / "pairs").write_text("")
    assert SourceSpec.parse(str(numbered)) == SourceSpec(str(numbered), str(tmp_path / "pairs"), 100)
    assert SourceSpec.parse(f"{numbered}:1.0") == SourceSpec(f"{numbered}:1.0", str(numbered), None)
    # a hub name or a missing file without an amount-like tail is still just a name
    assert SourceSpec.parse("org/name").amount is None
    assert SourceSpec.parse("notes:v2").path == "notes:v2"


def test_sampling_is_seeded_ordered_and_exact():
    a = sample_rows(1000, 0.25, seed=1, key="src", what="src:0.25")
    assert len(a) == 250 and a == sorted(a)
    assert a == sample_rows(1000, 0.25, seed=1, key="src", what="src:0.25")
    assert a != sample_rows(1000, 0.25, seed=2, key="src", what="src:0.25")
    assert len(sample_rows(1000, 17, seed=1, key="src", what="src:17")) == 17
    # Pinned: the sample must not change with Python or numpy versions.
    assert sample_rows(10, 3, seed=42, key="k", what="k:3") == [3, 4, 7]
    with pytest.raises(UsageError, match="only 10"):
        sample_rows(10, 11, seed=1, key="src", what="src:11")
    with pytest.raises(UsageError, match=r"--data src:0.01: takes no rows \(0.01 of 10 rounds to 0\)"):
        sample_rows(10, 0.01, seed=1, key="src", what="--data src:0.01")
    assert len(pick_fraction(100, 0.1, 0, "eval")) == 10


def test_resolve_source_kinds(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "folder" / "notes.txt").write_text("ignored")
    assert [f.name for f in resolve_source(str(tmp_path / "folder")).files] == ["a.jsonl"]
    assert resolve_source("org/some-dataset").kind == "hub"
    with pytest.raises(UsageError, match="no such file"):
        resolve_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no"):
        resolve_source(str(tmp_path / "empty"))


# ------------------------------------------------------------------ splits and configs: NAME#[CONFIG/]SPLIT


def test_source_spec_split_config_and_amount():
    parse = SourceSpec.parse
    spec = parse("HuggingFaceH4/ultrafeedback_binarized#test_prefs")
    assert (spec.path, spec.config, spec.split, spec.amount) == ("HuggingFaceH4/ultrafeedback_binarized", None,
                                                                  "test_prefs", None)
    spec = parse("allenai/ai2_arc#ARC-Easy/test:0.5", "--eval-data")
    assert (spec.path, spec.config, spec.split, spec.amount, spec.flag) == ("allenai/ai2_arc", "ARC-Easy", "test", 0.5,
                                                                             "--eval-data")
    assert spec.selector == "#ARC-Easy/test" and spec.named == "--eval-data allenai/ai2_arc#ARC-Easy/test:0.5"
    spec = parse("org/name#v1.0/:1000")
    assert (spec.config, spec.split, spec.amount) == ("v1.0", None, 1000)
    assert parse("org/name#train.clean").split == "train.clean"
    assert parse("org/name:0.25") == SourceSpec("org/name:0.25", "org/name", 0.25)
    assert (parse("org/name").config, parse("org/name").split) == (None, None)
    for bad in ("org/name#", "org/name#a/b/c", "org/name#two words", "#test", "org/name#/"):
        with pytest.raises(UsageError, match=re.escape("a source is NAME[#[CONFIG/]SPLIT][:AMOUNT]")):
            parse(bad)
    # the amount is still judged first, after the last colon
    with pytest.raises(UsageError, match="the amount '1e3' after the last ':'"):
        parse("org/name#test:1e3")
    with pytest.raises(UsageError, match=r"a fraction must be in \(0, 1\], got 1.5"):
        parse("org/name#test:1.5")


def test_file_names_with_hashes(tmp_path):
    odd = tmp_path / "v#2.jsonl"
    odd.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert parse_whole(str(odd)) == (str(odd), None, None, None)
    assert parse_whole(f"{odd}:0.5") == (str(odd), None, None, 0.5)
    with pytest.raises(UsageError, match=r"'#test' picks a split of a hub dataset or a saved DatasetDict folder"):
        resolve_source(f"{tmp_path / 'v#2.jsonl'}#test")


def parse_whole(text: str) -> tuple:
    spec = SourceSpec.parse(text)
    return spec.path, spec.config, spec.split, spec.amount


def _save_dict(root, **splits):
    import datasets

    rows = {"prompt": "q", "chosen": "a", "rejected": "b"}
    datasets.DatasetDict({name: datasets.Dataset.from_list([{**rows, "prompt": f"{name} {i}"} for i in range(n)])
                          for name, n in splits.items()}).save_to_disk(str(root))


def test_saved_dataset_dict_splits(tmp_path):
    root = tmp_path / "dd"
    _save_dict(root, train=3, test=2)
    train, evals = resolve_source(str(root)), resolve_source(str(root), "--eval-data")
    assert (train.kind, train.split, train.name) == ("dataset-split", "train", f"{root}#train")
    assert evals.split == "test"  # the one test-like split, never train
    assert [r.data["prompt"] for r in evals.read()] == ["test 0", "test 1"]
    assert [r.where for r in evals.read()][:1] == [f"{root}#test, row [0]"]
    picked = resolve_source(f"{root}#test:1")
    assert (picked.split, picked.spec.amount) == ("test", 1)
    assert picked.content_hash() == evals.content_hash() != train.content_hash()
    with pytest.raises(UsageError, match=r"has no split 'dev'; its splits: train, test \(write .*#SPLIT\)"):
        resolve_source(f"{root}#dev")
    with pytest.raises(UsageError, match="a saved DatasetDict folder has no configs"):
        resolve_source(f"{root}#cfg/test")

    two = tmp_path / "two"
    _save_dict(two, train=1, validation=1, test=1)
    with pytest.raises(UsageError, match=r"--eval-data .*two: name the eval split, e.g. --eval-data .*two#validation: "
                                         r"it has 2 test-like splits \(validation, test\), and --eval-data never falls "
                                         "back to the train split"):
        resolve_source(str(two), "--eval-data")
    only_train = tmp_path / "only"
    _save_dict(only_train, train=1, other=1)
    with pytest.raises(UsageError, match=r"it has no test-like split \(its splits: train, other\)"):
        resolve_source(str(only_train), "--eval-data")
    no_train = tmp_path / "prefs"
    _save_dict(no_train, train_prefs=1, test_prefs=1)
    assert resolve_source(str(no_train), "--eval-data").split == "test_prefs"
    with pytest.raises(UsageError, match=r"no split 'train'; its splits: train_prefs, test_prefs"):
        resolve_source(str(no_train))
