"""The CPU allocator setting of ``vlprompt.allocator``: applied through mallopt, skipped when the user opted out
or chose an allocator, and harmless to tensors. Its speed effect is measured by ``vlprompt bench`` (allocator)."""

import json
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import json
from vlprompt.allocator import tune_cpu_allocator
applied = tune_cpu_allocator()
import torch
# Allocations far above glibc's largest mmap threshold (32 MB), freed and allocated again: with mmap disabled
# they come from the heap, and their values must be what was written.
x = torch.ones(64 * 2**20 // 4); total = float(x.sum()); del x
y = torch.zeros(64 * 2**20 // 4); y += 2; total2 = float(y.sum())
print(json.dumps({"applied": applied, "sums": [total, total2]}))
"""


def run_probe(code: str, env_extra: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (the allocator is per process) without the user's allocator settings;
    return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "VLPROMPT_MALLOC")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning is glibc-only; elsewhere tune_cpu_allocator returns False")
def test_applied_on_glibc_and_tensors_are_unaffected():
    result = run_probe(PROBE)
    assert result["applied"] is True
    n = 64 * 2**20 // 4
    assert result["sums"] == [float(n), float(2 * n)]


@pytest.mark.parametrize("env", [{"VLPROMPT_MALLOC": "default"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
                                 {"LD_PRELOAD": ""}])
def test_user_choice_wins(env):
    assert run_probe(PROBE, env)["applied"] is False


def test_not_applied_off_glibc(monkeypatch):
    from vlprompt import allocator

    monkeypatch.delenv("VLPROMPT_MALLOC", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.tune_cpu_allocator() is False


def test_the_cli_applies_it(monkeypatch):
    """``vlprompt`` calls the tuning before running a command."""
    from vlprompt import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(True) or True)
    assert cli.main(["datasets"]) == 0
    assert calls == [True]


RELEASE_PROBE = """
import json, torch
from vlprompt.allocator import tune_cpu_allocator, release_memory
def rss_mb():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
assert tune_cpu_allocator()
blocks = [torch.ones(2**24) for _ in range(16)]  # 16 x 64 MB from the heap
keep = torch.ones(16)  # allocated last: sits above the blocks, so the heap top is not free
before = rss_mb(); del blocks; held = rss_mb(); released = release_memory(); after = rss_mb()
print(json.dumps({"before": before, "held": held, "after": after, "released": released}))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_release_memory_returns_what_the_tuned_heap_keeps():
    result = run_probe(RELEASE_PROBE)
    assert result["held"] > result["before"] - 512  # without mmap the freed 1 GB mostly stays resident ...
    assert result["released"] and result["after"] < result["held"] - 512  # ... until release_memory()
