"""The `vllm.general_plugins` entry point: installs the steering hooks in every vLLM process."""

from __future__ import annotations

import logging

from . import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

_registered = False


def register() -> None:
    """Install the hooks (idempotent). The engine's stay inert unless its additional_config has
    a "sae_steering" entry; in a process that runs vLLM's OpenAI layer, the `steering` field
    and the SAE routes are added (a server with no SAEs answers a steered request with 400)."""
    global _registered
    if _registered:
        return
    from . import (
        kernels,  # noqa: F401  (registers torch.ops.sae_vllm.steer_)
        offline_beam_search,
    )
    from .cpu_amx import request_amx_permission
    from .engine import compile_key, intake, prefix_cache, reach_report, worker
    from .engine import vllm_adapter as vllm

    vllm.check_vllm_version()
    request_amx_permission()  # also its own plugin; here too for VLLM_PLUGINS=sae_vllm alone
    vllm.prefer_v1_runner()
    if vllm.runs_on_cpu():
        vllm.keep_llvmlite_out_of_the_cpu_kernel_scan()
    vllm.patch_config_hash(compile_key.compile_key_factors)
    vllm.patch_request_intake(
        intake.check_params,
        intake.check_reach,
        intake.key_request,
        reach_report.sequence_end_reporter,
    )
    vllm.patch_prefix_cache_keys(prefix_cache.block_key)
    vllm.patch_session_updates(prefix_cache.continued_session_extra_args)
    vllm.patch_worker(worker.after_load_model, worker.after_update_states, worker.before_forward)
    vllm.add_worker_method("sae_steering_stats", worker.stats)
    # Offline (LLM, LLMEngine): installed whatever this process has imported, since vLLM may
    # load plugins (EngineArgs) before the script imports LLM or LLMEngine.
    vllm.patch_offline_sequence_reports(intake.judged_spec, reach_report.sequence_end_reporter)
    offline_beam_search.install()  # LLM.beam_search with steering_beam_params
    if vllm.runs_openai_frontend():  # `vllm serve` and `vllm run-batch` learn the steering field
        from .server import app

        app.install()
    _registered = True
