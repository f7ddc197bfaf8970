"""Shared test fixtures: the shipped demo files, tiny locally built models, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import socket
from pathlib import Path

import pytest

# The models here are tiny: a second intra-op thread only spins (and steals the core a subprocess or
# another xdist worker needs). Set before anything imports torch; child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
HH_DATA = DEMO / "data" / "hh-rlhf-harmless-test.jsonl.gz"
SHAREGPT_DATA = DEMO / "data" / "llamafactory-dpo-en-demo.json"
DEMO_MODEL = DEMO / "model"
GPT2_TOKENIZER = DEMO / "gpt2-tokenizer"
DPO = [sys.executable, "-m", "dpo.cli"]


def dpo_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )
    env.update(extra)
    return env


def run_dpo(*args: str | os.PathLike, check: bool = False, env: dict | None = None, timeout: float = 600,
            cwd: os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``dpo ARGS`` in a subprocess, as a user would; returns the completed process."""
    proc = subprocess.run(
        [*DPO, *map(str, args)], capture_output=True, text=True, env=env or dpo_env(), timeout=timeout, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"dpo {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous that may run beside another one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_llama(out: Path, tokenizer_dir: Path = DEMO_MODEL, hidden: int = 32, layers: int = 2,
                     seed: int = 0) -> Path:
    """A randomly initialised Llama saved with ``tokenizer_dir``'s tokenizer; no hub access."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return build_tiny_llama(tmp_path / "tiny-llama")
