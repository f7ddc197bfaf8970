"""Host memory for the model stages: freed tensor memory is reused, not faulted in again every batch."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from dpo.pipeline import modeling

# Where a GPU is present the model will not compute on the CPU, and the setting is left alone.
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not torch.cuda.is_available()

# 48 MiB tensors, above glibc's largest adaptive mmap threshold (32 MiB): without the setting each one
# is a fresh mapping whose every page faults in when it is written.
FAULTS = """
import json, resource, sys, torch
from dpo.pipeline.modeling import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else False
for _ in range(10):  # glibc settles where it places them (an aligned block needs a bit more than one freed)
    torch.empty(12 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(12 << 20).fill_(1.0)
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc malloc's, for CPU runs")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    pages = (48 << 20) // 4096
    default, kept = _faults("default"), _faults("keep")
    assert not default["kept"] and kept["kept"]
    assert default["faults"] >= 10 * pages  # every allocation faulted in again
    assert kept["faults"] < pages // 4  # freed pages are reused


@pytest.mark.parametrize("name, value", [("LD_PRELOAD", "libjemalloc.so.2"), ("MALLOC_MMAP_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")])
def test_an_allocator_the_user_chose_is_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert modeling.keep_freed_host_memory.__wrapped__() is False


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc malloc's, for CPU runs")
def test_loading_a_model_keeps_freed_memory(tiny_llama, monkeypatch):
    for name in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    modeling.keep_freed_host_memory.cache_clear()
    modeling.load_causal_lm(tiny_llama)
    assert modeling.keep_freed_host_memory.cache_info().currsize == 1
    assert modeling.keep_freed_host_memory() is True
