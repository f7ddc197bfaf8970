"""Preference pairs to token ids: chat templates, the prompt/response split, truncation.

How a pair becomes tokens:

- chat pairs (and plain pairs under ``--apply-chat-template``) are rendered with the chat template:
  the prompt with ``add_generation_prompt=True``, the whole conversation with the response as the
  final assistant turn. The template owns every special token, so rendered text is tokenized with
  ``add_special_tokens=False`` (as ``apply_chat_template(tokenize=True)`` does). The response ends
  at the template's EOS (text a template adds after it, such as a newline, is inter-turn padding
  and carries no loss); a template that emits no EOS gets one appended.
- plain pairs are ``BOS? + prompt + response + EOS`` without a template (TRL's non-conversational
  layout); BOS only if the tokenizer adds one to plain text.

Prompt and conversation are tokenized whole, so the response's ids are the ones the model sees in
context, and the prompt's ids are kept as its prefix. (Where the tokenizer provably splits the
conversation at the prompt's end, the response is tokenized on its own instead of the whole
conversation: the same ids, without tokenizing the prompt three times; see `SplitPoints`.) Where a
tokenizer merges across the boundary (a prompt ending in a space or a template ending in '>' that BPE
joins with the response's first character), the response text after the prompt is tokenized on its
own and appended, as TRL does: the prompt's ids stay identical in chosen and rejected by construction.
A template whose rendering of the prompt is not even a text prefix of the conversation (it renders
the prompt differently once the answer follows) cannot be split without mis-masking, so that pair is
reported as `PrefixMismatch` instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

from ..artifacts.fingerprint import FINGERPRINT_CHARS, hash_json, sha256_file
from ..artifacts.errors import ArtifactError, UsageError
from .formats import Drop, Pair

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep-start", "drop")
PROMPT_TRUNCATION_MODES = ("turns", "tokens")
# Where a plain-text prompt's turns start (Anthropic HH-RLHF dialogues).
_HH_TURN = re.compile(r"\n\nHuman:")
# Tokens of slack between the tokens a pair can keep of a text and where a huge text is cut before
# tokenizing (see PairEncoder.bound).
BOUND_MARGIN = 32
# Texts up to this many characters are never cut: tokenizing them costs little (well under a
# second), and an uncut text's drop reasons keep their exact token counts (rejects.jsonl).
MIN_CUT_CHARS = 100_000
# Files that define a tokenizer's behaviour (weights and model config excluded).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    tokenizer: str
    chat_template: str | None  # template text from --chat-template, overriding the tokenizer's
    apply_chat_template: bool
    max_seq_length: int
    max_prompt_length: int | None
    truncation: str
    chat_template_file: str | None = None  # where --chat-template's text came from, for messages
    prompt_truncation: str = "tokens"  # how a prompt over max_prompt_length is cut (PROMPT_TRUNCATION_MODES)


@dataclasses.dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    chosen: list[int]  # response ids, labelled
    rejected: list[int]
    truncated: bool  # the responses were cut to fit max_seq_length
    prompt_truncated: bool = False  # the prompt was cut to fit max_prompt_length


@dataclasses.dataclass(frozen=True)
class PrefixMismatch:
    """The prompt's tokens are not a prefix of prompt+response's tokens: masking would be wrong."""

    side: str
    detail: str


def tokenizer_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise UsageError(
            f"--tokenizer {path}: not a local folder. Hub names need network access, which this pipeline does not "
            "assume: download the tokenizer (save_pretrained) and pass its folder"
        )
    files = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model") for f in files):
        raise UsageError(f"--tokenizer {path}: no tokenizer files found (expected tokenizer.json or a vocabulary)")
    return files


def tokenizer_fingerprint(path: str) -> str:
    """A content hash of the tokenizer's files: the same tokenizer anywhere has the same fingerprint."""
    return hash_json([[f.name, sha256_file(f)] for f in tokenizer_files(path)])[:FINGERPRINT_CHARS]


def load_tokenizer(path: str):
    tokenizer_files(path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for an unloadable folder
        raise UsageError(f"--tokenizer {path}: cannot load it ({type(exc).__name__}: {exc})") from None
    if not tokenizer.is_fast:
        raise UsageError(f"--tokenizer {path}: is a slow (Python) tokenizer; dpo needs a fast one (tokenizer.json)")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"--tokenizer {path}: has no EOS token, so a response's end cannot be marked")
    return tokenizer


def tokenizer_info(tokenizer, fingerprint: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }


def effective_template(tokenizer, override: str | None) -> str | None:
    template = override if override is not None else tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default")
    return template or None


def read_template_file(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--chat-template {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
        raise UsageError(f"--chat-template {path}, line {line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); "
                         "save the template as UTF-8") from None
    if path.endswith(".json"):  # transformers' chat_template.json layout
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"--chat-template {path}: a .json template file needs a 'chat_template' string") from None
    if not text.strip():
        raise UsageError(f"--chat-template {path}: is empty")
    return text


def template_file(tokenizer: str) -> str:
    """The file of a tokenizer folder that holds its chat template (transformers' order of preference)."""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        if (Path(tokenizer) / name).is_file():
            return str(Path(tokenizer) / name)
    return tokenizer


# Onig's \s (Unicode White_Space), which the patterns below mean by a space; Python's isspace() also
# takes U+001C-U+001F, which these patterns count as symbols.
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(map(chr, range(0x2000, 0x200B)))
# Pre-tokenizer patterns (Split regexes, and ByteLevel's own, GPT-2's) that never look behind a position,
# with the spaces that no piece of theirs holds after a non-space character. GPT-2's (two spellings):
# a space only leads a piece or is in a piece of spaces, letters, digits and symbols are followed in a
# piece only by more of their kind; the one lookahead, (?!\S), follows spaces. Llama 3's (OpenAI's
# cl100k) and Qwen2's: the same, except that symbols take line breaks after them.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's use_regex
SPLIT_PATTERNS = {
    GPT2_PATTERN: WHITESPACE,
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": WHITESPACE,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        WHITESPACE - {"\r", "\n"},
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        WHITESPACE - {"\r", "\n"},
}


class SplitPoints:
    """Where a text tokenizes as its two parts do, each on its own: ``ids(text) == ids(text[:at]) +
    ids(text[at:])``, said only where it is certain.

    The tokenizer splits text at its added tokens, normalises the rest, cuts it into pieces with its
    pre-tokenizer and encodes every piece on its own. So the equation holds where no added token lies
    near ``at``, the normaliser leaves the two sides apart, and the pre-tokenizer cuts the text at
    ``at`` into the pieces the two sides make alone. That is certain for the pre-tokenizers made of
    SPLIT_PATTERNS (and digit splits, and ByteLevel's byte mapping) where a non-space character is
    followed by one of the pattern's spaces: no piece spans the two, a piece before them is decided by
    the same characters in either text (that space stops each as the end of the text does), and a piece
    after them cannot look back. With no normaliser or NFC (no character composes with a following
    space). A tokenizer of any other kind gets None from ``of``: every text is tokenized whole."""

    def __init__(self, spaces: frozenset[str], added: list[str], nfc: bool):
        self.spaces = spaces
        self.added = re.compile("|".join(map(re.escape, sorted(added, key=len, reverse=True)))) if added else None
        self.reach = max(map(len, added), default=0)
        self.nfc = nfc

    @classmethod
    def of(cls, backend) -> SplitPoints | None:
        normalizer = backend.normalizer and json.loads(backend.normalizer.__getstate__())
        if normalizer is not None and normalizer.get("type") != "NFC":
            return None
        spaces = backend.pre_tokenizer and _split_spaces(json.loads(backend.pre_tokenizer.__getstate__()))
        if not spaces:
            return None
        if getattr(backend.model, "dropout", None):  # BPE-dropout encodes at random
            return None
        return cls(spaces, [token.content for token in backend.get_added_tokens_decoder().values()], normalizer is not None)

    def splits(self, text: str, at: int) -> bool:
        if not 0 < at < len(text) or text[at] not in self.spaces or text[at - 1].isspace():
            return False
        if self.added is None:
            return True
        # Any added token within reach of ``at`` (a token next to it may strip or need the space): not certain.
        window = text[max(0, at - self.reach): at + self.reach]
        if self.added.search(window):
            return False
        return not (self.nfc and self.added.search(unicodedata.normalize("NFC", window)))


def _split_spaces(pre_tokenizer: dict) -> frozenset[str]:
    """The spaces before which the pre-tokenizer always splits after a non-space character (empty: none
    certain, e.g. for a step not known here, or no step that splits text at all)."""
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    spaces, splitting = WHITESPACE, False
    for k, step in enumerate(steps):
        kind = step.get("type")
        if kind == "Digits":
            continue
        if kind == "ByteLevel" and k == len(steps) - 1:  # last: later steps would see its byte characters
            if step.get("add_prefix_space"):  # a text not starting with a space gets one
                spaces &= {" "}
            if step.get("use_regex", True):
                spaces &= SPLIT_PATTERNS[GPT2_PATTERN]
                splitting = True
            continue
        pattern = step.get("pattern", {}).get("Regex") if kind == "Split" else None
        if pattern not in SPLIT_PATTERNS or step.get("behavior") != "Isolated" or step.get("invert"):
            return frozenset()
        spaces &= SPLIT_PATTERNS[pattern]
        splitting = True
    return spaces if splitting else frozenset()


class PairEncoder:
    """Turns Pairs into token ids in batches; one per process."""

    def __init__(self, settings: EncodeSettings):
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer)
        self.context = self.tokenizer.model_max_length
        # Lengths are enforced by --max-seq-length below; silence transformers' per-call length warning.
        self.tokenizer.model_max_length = sys.maxsize
        backend = self.tokenizer.backend_tokenizer
        # Encoding calls the Rust tokenizer directly, which pads and truncates as its tokenizer.json says
        # (transformers resets that per call of its own): dpo enforces lengths itself.
        backend.no_truncation()
        backend.no_padding()
        self.split_points = SplitPoints.of(backend)
        self.template = effective_template(self.tokenizer, settings.chat_template)
        self._compiled = False
        self.eos = self.tokenizer.eos_token_id
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        self.text_prefix = [bos] if bos is not None and probe[:1] == [bos] else []
        # No token covers more characters than its own spelling has (byte-level tokens spell one
        # character per byte; SentencePiece pieces spell their text): a text of this many
        # characters has at least max_seq_length + 2 * BOUND_MARGIN tokens. None: never cut.
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.max_chars: int | None = max((settings.max_seq_length + 2 * BOUND_MARGIN) * max(longest, 1), MIN_CUT_CHARS)

    # ---------------------------------------------------------------- huge texts

    def bound(self, pair: Pair) -> tuple[Pair, int]:
        """``pair`` with every text field longer than ``max_chars`` cut to the part a pair can keep,
        so that a single huge record (a 50 MB response) costs what a normal one does,
        and the length of the longest text cut (0: none). Responses keep their head (keep-start
        truncation keeps a response's first tokens), prompts their tail (a long prompt keeps its
        latest tokens, or is dropped whatever its length). The tokens kept are the ones the whole
        text gives: a cut text is used only if it has at least max_seq_length + BOUND_MARGIN tokens
        and those nearest the kept end equal the ones of a cut twice as long (so the cut is far
        from anything kept; a text whose tokens depend on text that far away is tokenized whole)."""
        limit = self.max_chars
        if limit is None:
            return pair, 0
        prompt_texts = [pair.prompt] if isinstance(pair.prompt, str) else [m["content"] for m in pair.prompt]
        if max(len(pair.chosen), len(pair.rejected), *map(len, prompt_texts)) <= limit:
            return pair, 0
        longest = 0

        def cut(text: str, keep_head: bool) -> str:
            nonlocal longest
            if len(text) <= limit:
                return text
            short, long = (text[:limit], text[: 2 * limit + 1]) if keep_head else (text[-limit:], text[-2 * limit - 1:])
            a, b = (e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast([short, long], add_special_tokens=False))
            keep = self.settings.max_seq_length
            stable = a[:keep] == b[:keep] if keep_head else a[-keep:] == b[-keep:]
            if len(a) < keep + BOUND_MARGIN or not stable:
                return text
            longest = max(longest, len(text))
            return short

        if isinstance(pair.prompt, str):
            prompt: str | tuple[dict[str, str], ...] = cut(pair.prompt, keep_head=False)
        else:
            prompt = tuple({**m, "content": cut(m["content"], keep_head=False)} for m in pair.prompt)
        bounded = Pair(prompt, cut(pair.chosen, keep_head=True), cut(pair.rejected, keep_head=True))
        return (bounded, longest) if longest else (pair, 0)

    def encode(self, pairs: list[Pair]) -> list[Encoded | Drop | PrefixMismatch]:
        """Each pair's tokens, or why it makes none. Under ``prompt_truncation`` "turns", a pair whose
        prompt is over ``max_prompt_length`` is encoded again with its earliest turns left out (the
        fewest that make it fit); where even its last turn is too long it keeps its latest tokens."""
        known: dict[str, list[int]] = {}  # text -> ids, so the second pass encodes nothing twice
        results = self._encode(pairs, known)
        if self.settings.prompt_truncation != "turns" or self.settings.max_prompt_length is None:
            return results
        cut = [i for i, r in enumerate(results) if isinstance(r, Encoded) and r.prompt_truncated]
        shorter = self._drop_turns([pairs[i] for i in cut], known)
        redo = [(i, pair) for i, pair in zip(cut, shorter) if pair is not None]
        for (i, _), result in zip(redo, self._encode([pair for _, pair in redo], known)):
            if isinstance(result, Encoded):
                results[i] = dataclasses.replace(result, prompt_truncated=True)
        return results

    def _drop_turns(self, pairs: list[Pair], known: dict[str, list[int]]) -> list[Pair | None]:
        """Each pair with the fewest earliest prompt turns left out that brings its prompt within
        max_prompt_length tokens; None where no turn boundary does (or the prompt has no turns). The
        ids of every prompt it encodes go into ``known``."""
        candidates = [self._later_turns(pair) for pair in pairs]
        chosen: list[Pair | None] = [None] * len(pairs)
        limit = self.settings.max_prompt_length
        # A plain prompt that splits at every turn (SplitPoints) is encoded once, turn by turn: each
        # candidate's ids are the ids of the turns it keeps.
        turns: dict[int, list[str]] = {}  # pair -> the texts of its prompt's turns after the first
        for k, (pair, options) in enumerate(zip(pairs, candidates)):
            if options and not self.uses_template(pair) and (pieces := self._plain_turns(pair.prompt)) is not None:
                turns[k] = pieces[1:]
        self._encode_new([text for texts in turns.values() for text in texts], known)
        for k, texts in turns.items():
            ids = [known[text] for text in texts]
            kept = list(itertools.accumulate(map(len, reversed(ids))))[::-1]  # tokens from turn j on
            j = next((j for j, n in enumerate(kept) if len(self.text_prefix) + n <= limit), None)
            if j is not None:
                chosen[k] = candidates[k][j]
                known[chosen[k].prompt] = [token for piece in ids[j:] for token in piece]
        texts, owners = [], []
        for k, options in enumerate(candidates):
            if k in turns:
                continue
            for j, option in enumerate(options):
                try:
                    texts.append(self._render_prompt(option))
                except Exception:  # noqa: BLE001 - a template that refuses the shortened conversation: not a candidate
                    continue
                owners.append((k, j))
        self._encode_new(texts, known)
        for (k, j), text in zip(owners, texts):
            prefix = 0 if self.uses_template(candidates[k][j]) else len(self.text_prefix)
            if chosen[k] is None and prefix + len(known[text]) <= limit:
                chosen[k] = candidates[k][j]
        return chosen

    def _plain_turns(self, prompt: str) -> list[str] | None:
        """A plain prompt cut where its later ``\\n\\nHuman:`` turns start, when the tokenizer certainly
        splits at each of those points (SplitPoints), so the prompt's ids are its pieces' ids in a row;
        else None."""
        if self.split_points is None:
            return None
        starts = [m.start() for m in _HH_TURN.finditer(prompt) if m.start() > 0]
        if not starts or not all(self.split_points.splits(prompt, at) for at in starts):
            return None
        return [prompt[a:b] for a, b in zip([0, *starts], [*starts, len(prompt)])]

    def _encode_new(self, texts: list[str], known: dict[str, list[int]]) -> None:
        """Add the ids of each of ``texts`` not in ``known`` to it, encoding each distinct text once."""
        new = list(dict.fromkeys(text for text in texts if text not in known))
        # The Rust tokenizer directly, without offsets: the same ids as tokenizer(texts), about twice as fast.
        known.update(zip(new, (e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(
            new, add_special_tokens=False))))

    @staticmethod
    def _later_turns(pair: Pair) -> list[Pair]:
        """The pair with 1, 2, ... of its earliest prompt turns left out, longest first. Chat prompts
        keep their leading system messages and start at a user turn; plain prompts start at a
        ``\\n\\nHuman:`` turn (HH-RLHF); a prompt without such turns has none."""
        if pair.is_chat:
            messages = pair.prompt
            head = 0
            while head < len(messages) and messages[head]["role"] in ("system", "developer"):
                head += 1
            starts = [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
            return [dataclasses.replace(pair, prompt=messages[:head] + messages[i:]) for i in starts]
        starts = [m.start() for m in _HH_TURN.finditer(pair.prompt) if m.start() > 0]
        return [dataclasses.replace(pair, prompt=pair.prompt[i:]) for i in starts]

    def _encode(self, pairs: list[Pair], known: dict[str, list[int]]) -> list[Encoded | Drop | PrefixMismatch]:
        """Each pair's tokens, or why it makes none; texts in ``known`` are not encoded again, and every
        text encoded here is added to it."""
        if not pairs:
            return []
        texts: list[str] = []  # per pair: prompt, prompt+chosen, prompt+rejected (rendered)
        encode: list[str] = []  # what is tokenized: the same, or a response alone where SplitPoints allows
        split: set[tuple[int, int]] = set()
        chat: list[bool] = []
        failed: dict[int, Drop] = {}
        cuts: dict[int, int] = {}
        points = self.split_points
        for i, pair in enumerate(pairs):
            pair, cuts[i] = self.bound(pair)
            rendered = self._render(pair)
            if isinstance(rendered, Drop):
                failed[i] = rendered
                rendered = ("", "", "")
            texts.extend(rendered)
            encode.append(rendered[0])
            for side in (1, 2):
                whole, at = rendered[side], len(rendered[0])
                if points is not None and points.splits(whole, at) and whole.startswith(rendered[0]):
                    encode.append(whole[at:])
                    split.add((i, side))
                else:
                    encode.append(whole)
            chat.append(pair.is_chat or self.settings.apply_chat_template)
        # A plain prompt that may be over max_prompt_length tokens (it has more characters: a loose bound, only
        # a cost) is encoded turn by turn where that gives its ids: if its earliest turns have to be left out,
        # the turns' ids are then known (see _drop_turns), and the prompt is not tokenized a second time.
        pieces: dict[str, list[str]] = {}
        if self.settings.prompt_truncation == "turns" and self.settings.max_prompt_length is not None:
            for i in range(len(pairs)):
                prompt_text = encode[3 * i]
                if (not chat[i] and len(prompt_text) > self.settings.max_prompt_length and prompt_text not in known
                        and (turns := self._plain_turns(prompt_text)) is not None):
                    pieces[prompt_text] = turns
        self._encode_new([piece for text in encode for piece in pieces.get(text, [text])], known)
        for text, turns in pieces.items():
            known[text] = [token for piece in turns for token in known[piece]]
        ids = [known[text] for text in encode]
        results: list[Encoded | Drop | PrefixMismatch | None] = []
        prompts = [(self.text_prefix if not c else []) + ids[3 * i] for i, c in enumerate(chat)]
        responses: dict[tuple[int, int], list[int]] = {}
        retokenize: list[tuple[int, int]] = []
        for i in range(len(pairs)):
            if i in failed:
                results.append(failed[i])
                continue
            prompt_text, prompt = texts[3 * i], prompts[i]
            results.append(None)
            for side in (1, 2):
                if (i, side) in split:  # the whole text's ids are the prompt's followed by these
                    responses[i, side] = ids[3 * i + side]
                    continue
                full = (self.text_prefix if not chat[i] else []) + ids[3 * i + side]
                if full[: len(prompt)] == prompt:
                    responses[i, side] = full[len(prompt):]
                elif texts[3 * i + side].startswith(prompt_text):
                    retokenize.append((i, side))
                else:
                    results[i] = self._mismatch(prompt, full, chat[i], side, texts[3 * i : 3 * i + 3])
                    if cuts[i]:
                        results[i] = dataclasses.replace(results[i], detail=results[i].detail + self._cut_note(cuts[i]))
                    break
        if retokenize:
            tails = [texts[3 * i + side][len(texts[3 * i]):] for i, side in retokenize]
            self._encode_new(tails, known)
            responses.update({key: known[tail] for key, tail in zip(retokenize, tails)})
        for i in range(len(pairs)):
            if results[i] is None:
                results[i] = self._split(prompts[i], responses[i, 1], responses[i, 2], chat[i])
                if cuts[i] and isinstance(results[i], Drop):
                    results[i] = dataclasses.replace(results[i], detail=results[i].detail + self._cut_note(cuts[i]))
        return results

    def _cut_note(self, length: int) -> str:
        # Counts in a drop's detail are of the cut text; the pair is dropped for the same reason either way.
        return f" (counted after cutting a {length:,}-character text to {self.max_chars:,} characters before tokenizing)"

    @staticmethod
    def _mismatch(prompt: list[int], full: list[int], chat: bool, side: int, texts: list[str]) -> PrefixMismatch:
        name = "chosen" if side == 1 else "rejected"
        at = next(k for k in range(len(prompt)) if k >= len(full) or full[k] != prompt[k])
        what = "the chat template's rendering of the prompt" if chat else "the prompt text"
        return PrefixMismatch(
            name,
            f"{what} is not a prefix of prompt+{name} (they diverge at token {at}: prompt renders "
            f"{texts[0][-60:]!r}, prompt+{name} renders {texts[side][len(texts[0]) - 60 : len(texts[0]) + 20]!r})",
        )

    # ---------------------------------------------------------------- the chat template as configuration

    @property
    def template_source(self) -> str:
        """Where the template comes from, as a user would name it."""
        if self.settings.chat_template is not None:
            return f"--chat-template {self.settings.chat_template_file or '(text)'}"
        return f"the chat template of --tokenizer {self.settings.tokenizer} ({template_file(self.settings.tokenizer)})"

    def uses_template(self, pair: Pair) -> bool:
        return pair.is_chat or self.settings.apply_chat_template

    def check_template(self) -> None:
        """A template that does not compile is a configuration error, found before any data is read
        (otherwise every chat record would become a ``template_error`` drop)."""
        if self.template is None or self._compiled:
            return
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
        except ImportError:  # a transformers without it: the first render (check_renders) still catches it
            return
        try:
            _compile_jinja_template(self.template)
        except Exception as exc:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
            raise UsageError(f"{self.template_source} does not compile: {_jinja_message(exc)}. Fix the template "
                             "(or pass a working one with --chat-template FILE)") from None
        self._compiled = True

    def check_renders(self, pair: Pair, where: str) -> None:
        """The first chat pair must render: a template that fails on it fails on the data as a whole,
        which is a configuration error, not a reason to drop records. (A template that renders the
        first conversation but refuses a later one, e.g. "roles must alternate", drops that record.)"""
        self.check_template()
        try:
            self._render_text(pair)
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors
            raise UsageError(
                f"{self.template_source} fails on the first chat record ({where}): {_jinja_message(exc)}. A template "
                "that cannot render the first conversation is a configuration error: fix the template (or pass a "
                "working one with --chat-template FILE)"
            ) from None

    def _render(self, pair: Pair) -> tuple[str, str, str] | Drop:
        try:
            return self._render_text(pair)
        except Exception as exc:  # noqa: BLE001 - templates raise their own errors (e.g. roles must alternate)
            return Drop("template_error", f"the chat template refused this conversation: {type(exc).__name__}: {exc}")

    def _render_text(self, pair: Pair) -> tuple[str, str, str]:
        if not self.uses_template(pair):
            return pair.prompt, pair.prompt + pair.chosen, pair.prompt + pair.rejected
        prompt = self._messages(pair)
        return (
            self._apply(prompt, add_generation_prompt=True),
            self._apply(prompt + [{"role": "assistant", "content": pair.chosen}]),
            self._apply(prompt + [{"role": "assistant", "content": pair.rejected}]),
        )

    def _render_prompt(self, pair: Pair) -> str:
        return self._apply(self._messages(pair), add_generation_prompt=True) if self.uses_template(pair) else pair.prompt

    @staticmethod
    def _messages(pair: Pair) -> list[dict[str, str]]:
        return list(pair.prompt) if pair.is_chat else [{"role": "user", "content": pair.prompt}]

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _split(self, prompt: list[int], chosen: list[int], rejected: list[int], chat: bool) -> Encoded | Drop:
        chosen, rejected = self._finish(chosen, chat), self._finish(rejected, chat)
        whole = len(prompt)
        prompt = self._cut_prompt(prompt)
        s = self.settings
        truncated = False
        if len(prompt) + max(len(chosen), len(rejected)) > s.max_seq_length:
            if s.truncation == "drop":
                return Drop("too_long", f"{len(prompt)} prompt + {max(len(chosen), len(rejected))} response tokens > --max-seq-length {s.max_seq_length}")
            room = s.max_seq_length - len(prompt)
            if room <= 0:
                return Drop("no_trainable_tokens", f"the {len(prompt)}-token prompt fills --max-seq-length {s.max_seq_length}")
            chosen, rejected, truncated = chosen[:room], rejected[:room], True
            if chosen == rejected:
                return Drop("identical_after_truncation",
                            f"chosen and rejected share their first {room} tokens, all that --max-seq-length leaves")
        return Encoded(prompt, chosen, rejected, truncated, len(prompt) < whole)

    def _finish(self, response: list[int], chat: bool) -> list[int]:
        if chat and self.eos in response:
            return response[: len(response) - response[::-1].index(self.eos)]
        return response + [self.eos]

    def _cut_prompt(self, prompt: list[int]) -> list[int]:
        """Keep the end of an over-long prompt (its latest turns), and its BOS if it has one."""
        limit = self.settings.max_prompt_length
        if limit is None or len(prompt) <= limit:
            return prompt
        bos = self.tokenizer.bos_token_id
        if bos is not None and prompt[0] == bos and limit > 1:
            return [bos] + prompt[len(prompt) - limit + 1 :]
        return prompt[len(prompt) - limit :]


# More than this share of the records dropped, or of the pairs cut, is worth a warning at the end of tokenize.
WARN_SHARE = 0.05
# What a user changes when pairs are dropped for each reason; a reason not listed lies in the data.
DROP_REMEDIES = {
    "no_trainable_tokens": "--max-prompt-length leaves the responses room (0 turns the limit off); or raise --max-seq-length",
    "too_long": "raise --max-seq-length, or --truncation keep-start keeps such pairs with their responses cut",
    "identical_after_truncation": "raise --max-seq-length",
    "prompt_not_token_prefix": "fix the chat template (--chat-template FILE)",
    "template_error": "fix the chat template (--chat-template FILE) or the data",
}


def data_loss_warnings(records: int, pairs: int, dropped: dict[str, int], truncated: int,
                       prompt_truncated: int) -> list[str]:
    """One sentence each for the ways tokenize lost data when more than a few percent of it was lost:
    records dropped (by reason, with the option that keeps them), responses cut, prompts cut."""
    warnings = []
    lost = sum(dropped.values())
    if records and lost > WARN_SHARE * records:
        reasons = "; ".join(f"{reason} {n}: {DROP_REMEDIES.get(reason, 'see rejects.jsonl (the data)')}"
                            for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        warnings.append(f"{lost} of {records} records ({lost / records:.1%}) were dropped ({reasons})")
    if pairs and truncated > WARN_SHARE * pairs:
        warnings.append(f"{truncated} of {pairs} pairs ({truncated / pairs:.1%}) had their responses cut to fit "
                        "--max-seq-length: raise it (or lower --max-prompt-length), or --truncation drop leaves them out")
    if pairs and prompt_truncated > WARN_SHARE * pairs:
        warnings.append(f"{prompt_truncated} of {pairs} pairs ({prompt_truncated / pairs:.1%}) had their prompts cut "
                        "to --max-prompt-length (how: --prompt-truncation): raise it, or 0 for no limit")
    return warnings


def _jinja_message(exc: Exception) -> str:
    """A Jinja error as one line: its type, the template line when known, and its message."""
    line = getattr(exc, "lineno", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}{f' at template line {line}' if line else ''}: {message}"


def tokenizer_with_template(candidates: list[str | Path | None], chat_template: str | None):
    """The first loadable tokenizer among ``candidates`` (folders, in the caller's order of
    preference), carrying ``chat_template``: the template the pairs were tokenized with, which is not
    the folder's own when tokenize had --chat-template. An ArtifactError lists what was tried."""
    from transformers import AutoTokenizer

    tried = []
    for folder in candidates:
        if folder is None or str(folder) in tried:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError):
            tried.append(str(folder))
            continue
        if chat_template:
            tokenizer.chat_template = chat_template
        return tokenizer
    raise ArtifactError(f"no tokenizer could be loaded from any of: {', '.join(tried) or 'no candidates'}")
