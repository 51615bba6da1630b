"""Staged device tensors on CUDA: the per-step table writes never wait for the GPU, and a host
copy is never rewritten while a queued copy still has to read it.

Runs on a bare GPU box with `PYTHONPATH=. pytest tests/test_staging_gpu.py` (torch and numpy
only); skipped without CUDA. Its CPU twin is the staged-vs-direct test in test_tables.py."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sae_vllm.engine.staging import StagedTensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Long enough that every host-side step below finishes well before the GPU does.
BUSY_CYCLES = 500_000_000


def busy_stream() -> float:
    """Queue a kernel that keeps the current stream busy; the seconds it takes."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(BUSY_CYCLES)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def test_writes_and_flushes_never_synchronise():
    busy_seconds = busy_stream()
    rows = torch.full((4096,), -1, dtype=torch.int32, device="cuda")
    staged = StagedTensor(rows)
    values = np.arange(4096, dtype=np.int32)
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    start = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        staged.writable()[:1000] = values[:1000]
        staged.flush(0, 1000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host_seconds = time.perf_counter() - start
    assert host_seconds < busy_seconds / 4, (host_seconds, busy_seconds)
    torch.cuda.synchronize()
    assert rows[:1000].cpu().numpy().tolist() == values[:1000].tolist()
    assert rows[1000:].eq(-1).all()


def test_the_host_copy_waits_for_the_copy_reading_it():
    rows = torch.zeros(1 << 20, dtype=torch.float32, device="cuda")
    staged = StagedTensor(rows)
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)  # the next copy runs only after this
    staged.writable()[:] = 1.0
    staged.flush()
    staged.writable()[:] = 2.0  # must wait until the queued copy has read the 1.0s
    torch.cuda.synchronize()
    assert rows.eq(1.0).all()
    staged.flush()
    torch.cuda.synchronize()
    assert rows.eq(2.0).all()


def test_cuda_graph_replay_reads_what_the_last_flush_wrote():
    rows = torch.zeros(256, dtype=torch.int32, device="cuda")
    staged = StagedTensor(rows)
    out = torch.empty(256, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out.copy_(rows * 2)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(rows * 2)
    for value in (3, 7, 11):
        staged.writable()[:] = value
        staged.flush()
        graph.replay()
        torch.cuda.synchronize()
        assert out.eq(2 * value).all(), value
