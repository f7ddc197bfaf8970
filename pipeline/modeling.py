"""Loading causal LMs, and naming one by content rather than by path.

Dropout is switched off at load time (DPO compares log-probs of the policy and the reference;
dropout noise on one side only biases the implicit reward, which is why TRL disables it too).

``model_identity`` is what a fingerprint records about a model: cheap by default, so a 70B
checkpoint is identified in well under a second of I/O (config, weight file names and sizes,
safetensors headers, and a hash of evenly spaced byte samples of each weight file), or exact
(full sha256 of every weight file) when asked.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import platform
import struct
from pathlib import Path
from typing import Any

import torch

from ..artifacts.fingerprint import hash_json, sha256_file
from ..artifacts.errors import ArtifactError, UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Fields transformers rewrites on every save_pretrained: not part of what the model computes.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 << 10
# glibc's malloc hands a freed block above its mmap threshold (adaptive, at most 32 MiB) back to the
# kernel, and trims the heap's free top past twice that; a forward or a step reallocates the same
# activation and gradient tensors every batch, so each batch faulted them in again, page by page
# (a packed cache-ref pass of the bench model: 10M page faults, 30 of its 72 seconds in the kernel).
# 64 MiB keeps them all on the bench model; 256 MiB was no faster and held 0.15 GiB more at peak.
HOST_MMAP_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
log = logging.getLogger(__name__)


@functools.cache
def keep_freed_host_memory() -> bool:
    """Have glibc's malloc keep freed blocks below HOST_MMAP_THRESHOLD for reuse; True when set.

    For a model that computes on the CPU: called once it is loaded, so the copies a load makes (freed
    when a model moves to a GPU) go back to the kernel as before. Left alone where a GPU is present,
    where the user chose an allocator or glibc malloc settings (``LD_PRELOAD``, ``MALLOC_*_``
    variables, ``GLIBC_TUNABLES``) and where the C library is not glibc."""
    chosen = [name for name in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
              if os.environ.get(name)]
    if chosen or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or torch.cuda.is_available():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # glibc before 2.35 or so refuses a threshold above 32 MiB (HEAP_MAX_SIZE / 2).
    threshold = next((size for size in (HOST_MMAP_THRESHOLD, 32 << 20) if mallopt(_M_MMAP_THRESHOLD, size)), None)
    kept = threshold is not None and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    log.debug("host allocator: freed blocks under %s MiB kept for reuse: %s", threshold and threshold >> 20, kept)
    return kept


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise UsageError(f"model {path}: no such directory (a local Hugging Face model folder is expected)")
    if not (path / "config.json").is_file():
        raise UsageError(f"model {path}: no config.json, so this is not a Hugging Face model folder")


def _dropout_rates(config) -> dict[tuple[bool, str], float]:
    """Every non-zero dropout rate of ``config`` and its text config, keyed by (in text config, name)."""
    rates = {}
    for is_text, sub in ((False, config), (True, config.get_text_config())):
        for key, value in vars(sub).items():
            if (key.endswith("dropout") or key.endswith("_pdrop") or key.endswith("dropout_prob")
                    or key.endswith("dropout_rate")) and isinstance(value, float) and value != 0.0:
                rates[is_text, key] = value
    return rates


def _set_dropout_rates(config, rates: dict[tuple[bool, str], float]) -> None:
    for (is_text, key), value in rates.items():
        setattr(config.get_text_config() if is_text else config, key, value)


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32", keep_dropout: bool = False,
                   device: str | torch.device | None = None, **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM`` from a local folder, dropout off unless ``keep_dropout``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    _check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    rates = {} if keep_dropout else _dropout_rates(config)
    if rates:
        _set_dropout_rates(config, dict.fromkeys(rates, 0.0))
        log.debug("dropout set to 0 in %s: %s", path, ", ".join(key for _, key in rates))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype(dtype), **kwargs)
    except SafetensorError as exc:
        names = ", ".join(p.name for p in weight_files(path)) or "its weight files"
        raise ArtifactError(f"model {path}: a weight file is corrupt or truncated ({names}: {exc})") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {path}: cannot be loaded as a causal LM: {exc}") from None
    # The modules were built with the zeroed rates; the config gets the original ones back so a
    # saved model (checkpoints, final/, export) keeps the base model's dropout for later fine-tuning.
    _set_dropout_rates(model.config, rates)
    if device is not None:
        model.to(device)
    keep_freed_host_memory()
    return model.eval()


def load_reward_model(path: str | os.PathLike, dtype: str = "float32"):
    """A sequence-classification model with one output (a reward model) and its tokenizer, in eval mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    _check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "num_labels", None) != 1:
        raise UsageError(f"--reward-model {path}: has {getattr(config, 'num_labels', None)} output labels; a reward "
                         "model is a sequence-classification model with num_labels=1 (one score per text)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--reward-model {path}: cannot be loaded as a sequence-classification model with its "
                         f"tokenizer: {exc}") from None
    keep_freed_host_memory()
    return model.eval(), tokenizer


def model_vocab_size(path: str | os.PathLike) -> int:
    """The vocabulary size of a model folder's config; for a PEFT adapter folder, of its base model's."""
    from transformers import AutoConfig

    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"model {path}: cannot read adapter_config.json: {exc}") from None
        if not base:
            raise UsageError(f"model {path}: adapter_config.json names no base_model_name_or_path")
        path = Path(base)
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model {path}: cannot read its config: {exc}") from None
    return config.get_text_config().vocab_size


def check_vocab(model: str | os.PathLike, tokenized: str | os.PathLike, manifest: Any) -> None:
    """Refuse a model whose vocabulary cannot hold the token ids of the tokenized artifact
    (``manifest``, at ``tokenized``): an embedding lookup past the table is a crash on CPU and a
    device-side assert on GPU, long after the job started. Every stage that feeds tokens to a model
    calls this before it takes its output."""
    info = manifest.stats.get("tokenizer_info") or {}
    tokenizer_vocab = info.get("vocab_size")
    if tokenizer_vocab is None:
        return
    vocab = model_vocab_size(model)
    if tokenizer_vocab > vocab:
        tokenizer = manifest.config.get("tokenizer")
        raise UsageError(
            f"model {model} has a vocabulary of {vocab} tokens, but {tokenized} was tokenized with "
            f"{f'--tokenizer {tokenizer}, ' if tokenizer else ''}a tokenizer of {tokenizer_vocab} tokens "
            f"(ids up to {tokenizer_vocab - 1}): this is not the model those tokens were made for. "
            "Tokenize with the model's own tokenizer, or pass the model the tokens were made for"
        )


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _safetensors_header(f, size: int) -> bytes | None:
    if size < 8:
        return None
    f.seek(0)
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length) if 8 + length <= size else None


def _sampled_file(path: Path) -> dict[str, Any]:
    import hashlib

    size = path.stat().st_size
    entry: dict[str, Any] = {"name": path.name, "bytes": size}
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            header = _safetensors_header(f, size)
            entry["header_sha256"] = hashlib.sha256(header or b"").hexdigest()
        digest = hashlib.sha256()
        if size <= SAMPLES_PER_FILE * SAMPLE_BYTES:
            f.seek(0)
            digest.update(f.read())
        else:
            # Evenly spaced from the first byte to the last block, so both ends are always read.
            stride = (size - SAMPLE_BYTES) / (SAMPLES_PER_FILE - 1)
            for k in range(SAMPLES_PER_FILE):
                f.seek(int(k * stride))
                digest.update(f.read(SAMPLE_BYTES))
        entry["sample_sha256"] = digest.hexdigest()
    return entry


def model_identity(path: str | os.PathLike, exact: bool = False) -> dict[str, Any]:
    """What a model folder holds, independent of where it lives.

    ``sampled_digest`` is always present; ``sha256_digest`` only with ``exact``. ``digest`` is the
    one to fingerprint with: the exact one when computed.
    """
    path = Path(path)
    _check_model_dir(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"model {path}: config.json is not valid JSON: {exc}") from None
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    files = weight_files(path)
    if not files:
        raise UsageError(f"model {path}: no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    entries = [_sampled_file(p) for p in files]
    identity: dict[str, Any] = {
        "config_sha256": hash_json(config),
        "files": entries,
        "sampled_digest": hash_json({"config": hash_json(config), "files": entries})[:32],
    }
    if exact:
        for entry, p in zip(entries, files):
            entry["sha256"] = sha256_file(p)
        identity["sha256_digest"] = hash_json(
            {"config": identity["config_sha256"], "files": [(e["name"], e["sha256"]) for e in entries]}
        )[:32]
    identity["exact"] = exact
    identity["digest"] = identity["sha256_digest"] if exact else identity["sampled_digest"]
    return identity
