"""Every touch of vLLM 0.32's OpenAI-server internals is here, so a vLLM bump changes one file."""

# What it uses: vLLM's serve arg parser and checks; `vllm serve`'s command (`ServeSubcommand.cmd`);
# `build_app` (wrapped in its module, so every app vLLM's API server builds in this process is
# customised: `sae-vllm serve`, and `vllm serve` with this package installed); the completion,
# chat and responses request models (subclassed with a typed `steering` field, and a
# `to_sampling_params` that puts the resolved spec into SamplingParams.extra_args; vLLM's own
# models also carry an untyped `steering` extra field, for `vllm run-batch`); the Anthropic
# Messages request model (subclassed likewise; the spec rides in its `vllm_xargs`, which vLLM
# copies into the chat request it converts it to); their POST routes
# (rebuilt around the subclasses, so FastAPI parses and documents the field and vLLM's own
# handler runs); SageMaker's `/invocations` table of body types and endpoints (the same
# steered models and endpoints for completion and chat bodies; the others refuse `steering`);
# run-batch's `handle_endpoint_request` (wrapped, so that lines carrying
# `steering` to other routes, nested in `extra_body`, or twice, fail); the online beam
# search (`BeamSearchOnlineMixin.beam_search`, wrapped so that each beam step's request carries
# the spec: vLLM builds those SamplingParams itself, without extra_args); the Responses API's
# `OpenAIServingResponses._generate_with_builtin_tools` (wrapped, to judge a spec's reach before
# a stream starts); `AnthropicServingMessages.create_messages` (wrapped: a refused spec is
# answered without vLLM's error log); the `GET /v1/responses/{id}` and `GET /v1/models` routes
# (wrapped: steering headers, variants' cards);
# `OpenAIServingModels._check_load_lora_adapter_request` (wrapped: runtime LoRA adapters may not
# take a steering variant's name); and, for `sae-vllm serve`'s start-up, `AsyncEngineArgs`
# (`create_model_config`), `validate_parsed_serve_args`, `cli_env_setup` and
# `configure_logging_from_args`.

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ConfigDict, Field, PrivateAttr, SkipValidation
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.exceptions import VLLMValidationError

from sae_vllm.config import (
    BEAM_STEERING_ATTR,
    DROPPED_GENERATION_KEY,
    EXTRA_ARGS_KEY,
    GENERATION_START_KEY,
    steering_config_from,
)
from sae_vllm.engine import reach_report
from sae_vllm.engine.intake import check_beam_reach, check_reach
from sae_vllm.engine.sequence_ends import reporting_sequence_ends
from sae_vllm.engine.vllm_adapter import (
    as_client_error,
    prompt_length_of_input,
    with_added_extra_args,
    wrap_once,
)
from sae_vllm.spec import SteeringSpec

from . import batch_lines, metrics, rejections
from .steering import (
    STEERED,
    STEERING_FIELD,
    STEERING_HEADER,
    UNREACHED_HEADER,
    UNSTEERED,
    XARGS_FIELD,
    Rejection,
    SteeringGate,
    engine_rejection,
    error_message_of,
    xargs_spec_of,
)
from .stored_responses import (
    FINISHED,
    StoredResponses,
    StoredSteering,
    field_of,
    remembering_response_id,
)
from .stream_admission import counting_once_taken
from .stream_report import reporting_unreached

_MEMORY_DEFAULT = "_sae_vllm_gpu_memory_utilization_default"

STEERING_DOC = (
    "SAE feature edits applied to this request only (sae-vllm). Example: "
    '{"edits": [{"sae": "res12", "feature": 1234, "op": "set", "value": 8.0}], '
    '"apply_to": "generated"}; add "window": {"end": 16} to steer the first 16 generated '
    "tokens only. An edit may give its own apply_to and window. SAE ids and sizes: "
    "GET /v1/saes."
)


def _with_steering(params: Any, spec: Any) -> Any:
    if spec is not None:
        params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: spec}
    return params


def _beam_with_steering(params: Any, spec: Any) -> Any:
    if spec is not None:
        setattr(params, BEAM_STEERING_ATTR, spec)  # BeamSearchParams keeps a __dict__
    return params


def _without_xargs_spec(xargs: dict | None) -> dict | None:
    """vllm_xargs less the low-level spec key (the gate's resolved spec takes its place)."""
    if not xargs or EXTRA_ARGS_KEY not in xargs:
        return xargs
    return {k: v for k, v in xargs.items() if k != EXTRA_ARGS_KEY}


class _SpecCarriedToSamplingParams:
    """For vLLM's OpenAI request models: the gate's resolved spec text, kept in the model's
    private `_sae_steering` (declared by each model), goes into the SamplingParams it builds."""

    def carry_steering(self, spec: str | None) -> None:
        self.vllm_xargs = _without_xargs_spec(self.vllm_xargs)
        self._sae_steering = spec

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> Any:
        params = super().to_sampling_params(*args, **kwargs)  # type: ignore[misc]
        return _with_steering(params, self._sae_steering)


class SteeredCompletionRequest(_SpecCarriedToSamplingParams, CompletionRequest):
    """vLLM's completion request plus the `steering` field."""

    field_names: ClassVar[set[str] | None] = None  # vLLM caches known field names per class
    # Validated by SteeringGate (one path, one set of messages for HTTP and offline users);
    # typed so that /openapi.json documents it.
    steering: SkipValidation[SteeringSpec | None] = Field(default=None, description=STEERING_DOC)
    _sae_steering: str | None = PrivateAttr(default=None)

    def to_beam_search_params(self, *args: Any, **kwargs: Any) -> Any:
        params = super().to_beam_search_params(*args, **kwargs)
        return _beam_with_steering(params, self._sae_steering)

    def to_sampling_params(self, *args: Any, **kwargs: Any) -> Any:
        params = super().to_sampling_params(*args, **kwargs)
        if self._sae_steering is not None and self.echo and self.max_tokens == 0:
            params.extra_args[DROPPED_GENERATION_KEY] = True  # a dict of its own
        return params


class SteeredChatCompletionRequest(_SpecCarriedToSamplingParams, ChatCompletionRequest):
    """vLLM's chat completion request plus the `steering` field."""

    field_names: ClassVar[set[str] | None] = None
    steering: SkipValidation[SteeringSpec | None] = Field(default=None, description=STEERING_DOC)
    _sae_steering: str | None = PrivateAttr(default=None)

    def to_beam_search_params(self, *args: Any, **kwargs: Any) -> Any:
        params = super().to_beam_search_params(*args, **kwargs)
        return _beam_with_steering(params, self._sae_steering)


class SteeredResponsesRequest(_SpecCarriedToSamplingParams, ResponsesRequest):
    """vLLM's Responses API request plus the `steering` field."""

    field_names: ClassVar[set[str] | None] = None
    steering: SkipValidation[SteeringSpec | None] = Field(default=None, description=STEERING_DOC)
    _sae_steering: str | None = PrivateAttr(default=None)


class SteeredMessagesRequest(AnthropicMessagesRequest):
    """vLLM's Anthropic Messages request plus the `steering` field."""

    # Unknown fields are kept (vLLM's model drops them), so the gate sees a nested extra_body.
    model_config = ConfigDict(extra="allow")
    steering: SkipValidation[SteeringSpec | None] = Field(default=None, description=STEERING_DOC)

    def carry_steering(self, spec: str | None) -> None:
        # vLLM turns this request into a chat request, carrying vllm_xargs (string values) over.
        xargs = _without_xargs_spec(self.vllm_xargs) or {}
        if spec is not None:
            xargs = {**xargs, EXTRA_ARGS_KEY: spec}
        self.vllm_xargs = xargs or None


def _carrying_extra_steering(attach: Callable[[Any, dict | None], Any]):
    def make(original: Callable) -> Callable:
        def to_params(self: Any, *args: Any, **kwargs: Any) -> Any:
            params = original(self, *args, **kwargs)
            return attach(params, (self.model_extra or {}).get(STEERING_FIELD))

        return to_params

    return make


def carry_steering_extra_field() -> None:
    """vLLM's own request models keep an unknown `steering` field as an extra and drop it; make
    them hand it to the engine, which validates it (a bad spec fails the request, never
    silently unsteered). This is the path of requests that do not reach the steered routes'
    models, such as `vllm run-batch` lines; the steered subclasses declare the field, so it is
    never an extra there."""
    for model in (CompletionRequest, ChatCompletionRequest, ResponsesRequest):
        for name, attach in (
            ("to_sampling_params", _with_steering),
            ("to_beam_search_params", _beam_with_steering),
        ):
            if hasattr(model, name):
                wrap_once(model, name, _carrying_extra_steering(attach))


def refuse_misplaced_steering_in_batch_lines() -> None:
    """In `vllm run-batch`, fail with a 400 error line, in the server's shape and with its
    reason, instead of running unsteered, a line that carries `steering` to a route that cannot
    apply it (embeddings, score, rerank, audio), nests it in a literal `extra_body` field, gives
    it twice, or whose spec the server would refuse (see batch_lines)."""
    from vllm.entrypoints.launchers import run_batch

    def make_run_batch(original: Callable) -> Callable:
        async def run_batch_with_gate(engine_client: Any, args: Any, *a: Any, **kw: Any) -> Any:
            config = steering_config_from(getattr(args, "additional_config", None))
            token = batch_lines.batch_gate.set(batch_lines.gate_for(config))
            try:
                return await original(engine_client, args, *a, **kw)
            finally:
                batch_lines.batch_gate.reset(token)

        return run_batch_with_gate

    def make_handler(original: Callable) -> Callable:
        def handle_endpoint_request(request: Any, *args: Any, **kwargs: Any) -> Any:
            gate = batch_lines.batch_gate.get()
            rejection = batch_lines.line_refusal(request.url, request.body, gate)
            if rejection is not None:
                line = run_batch.make_error_request_output(request, error_msg=str(rejection))
                line.error = batch_lines.error_body(rejection)
                return _ready(line)
            pending = original(request, *args, **kwargs)
            param = batch_lines.spec_field(request.body)
            if pending is None or param is None:
                return pending
            return _with_engine_refusal_reason(pending, param)

        return handle_endpoint_request

    wrap_once(run_batch, "run_batch", make_run_batch)
    wrap_once(run_batch, "handle_endpoint_request", make_handler)


async def _ready(value: Any) -> Any:
    return value


async def _with_engine_refusal_reason(pending: Any, param: str) -> Any:
    """A batch line's output, its error in the server's shape when the engine refused its spec
    once the prompt was tokenized (as the server's 400 for the same request)."""
    line = await pending
    body = batch_lines.engine_refusal_body(line.error, param)
    if body is not None:
        line.error = body
    return line


# path -> (request model, metrics endpoint label)
STEERED_ROUTES: dict[str, tuple[type, str]] = {
    "/v1/completions": (SteeredCompletionRequest, "completions"),
    "/v1/chat/completions": (SteeredChatCompletionRequest, "chat.completions"),
    "/v1/responses": (SteeredResponsesRequest, "responses"),
    "/v1/messages": (SteeredMessagesRequest, "messages"),
}


# --- beam search ----------------------------------------------------------------------------


class _SteeringEngineClient:
    """The engine client, with `extra_args` added to every request it is asked to generate."""

    def __init__(self, client: Any, extra_args: dict[str, Any]):
        self._client = client
        self._extra_args = extra_args

    def generate(self, prompt: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        params = with_added_extra_args(sampling_params, self._extra_args)
        return self._client.generate(prompt, params, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _WithEngineClient:
    """A serving object seen through another engine client."""

    def __init__(self, serving: Any, engine_client: Any):
        self._serving = serving
        self.engine_client = engine_client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._serving, name)


def install_steered_beam_search() -> None:
    """Make vLLM's online beam search carry a request's steering into every beam step.

    Each step re-submits the tokens generated so far as prompt; the steps also carry where the
    original prompt ends, so the spec's scope still counts those tokens as generated."""
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin

    def make(original: Callable) -> Callable:
        async def beam_search(
            self: Any, prompt: Any, request_id: str, params: Any, *args: Any, **kwargs: Any
        ) -> Any:
            spec = getattr(params, BEAM_STEERING_ATTR, None)
            serving, beam_ended = self, None
            if spec is not None:
                decoder_prompt = prompt["decoder_prompt"] if prompt["type"] == "enc_dec" else prompt
                prompt_length = len(decoder_prompt["prompt_token_ids"])
                search = (self.engine_client.vllm_config, spec, prompt_length, params.max_tokens)
                steering = as_client_error(check_beam_reach, *search)
                step_args = {EXTRA_ARGS_KEY: spec, GENERATION_START_KEY: prompt_length}
                serving = _WithEngineClient(
                    self, _SteeringEngineClient(self.engine_client, step_args)
                )
                # its steps are not judged alone: its beams are, as they end
                beam_ended = reach_report.sequence_end_reporter(steering, prompt_length, request_id)
            outputs = original(serving, prompt, request_id, params, *args, **kwargs)
            if beam_ended is not None:
                outputs = reporting_sequence_ends(outputs, False, beam_ended)
            async for output in outputs:
                yield output

        return beam_search

    wrap_once(BeamSearchOnlineMixin, "beam_search", make)


def check_responses_reach_before_streaming() -> None:
    """Make the Responses API refuse a spec that steers none of a request's positions before
    its stream starts, as the other routes do (see vllm_adapter.patch_request_intake): it asks
    the engine for a generator only once its own generator runs, after a stream's headers."""
    from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses

    def make(original: Callable) -> Callable:
        signature = inspect.signature(original)

        def _generate_with_builtin_tools(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs).arguments
            params = bound["sampling_params"]
            num_prompt_tokens = prompt_length_of_input(bound["engine_input"])
            if num_prompt_tokens is not None:
                vllm_config = self.engine_client.vllm_config
                as_client_error(
                    check_reach, vllm_config, params, num_prompt_tokens, params.max_tokens
                )
            return original(self, *args, **kwargs)

        return _generate_with_builtin_tools

    wrap_once(OpenAIServingResponses, "_generate_with_builtin_tools", make)


def answer_messages_refusals_quietly() -> None:
    """Make the Anthropic Messages route answer the engine's refusal of a spec (steers_nothing)
    as the other routes do, without logging it: vLLM's route logs any exception its handler
    raises as an error with a traceback, and a client's bad spec is no server error."""
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.serve import create_error_response

    def make(original: Callable) -> Callable:
        async def create_messages(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await original(self, *args, **kwargs)
            except VLLMValidationError as exc:
                if exc.parameter != STEERING_FIELD:
                    raise
                return create_error_response(exc)  # the route's own answer to it

        return create_messages

    wrap_once(AnthropicServingMessages, "create_messages", make)


# --- SageMaker /invocations ----------------------------------------------------------------

INVOCATIONS_PATH = "/invocations"
# vLLM's /invocations replaces the body's `model` with this header's value (None without it):
# SageMaker's hosting standard (`inject_adapter_id`), how a client picks a LoRA adapter there.
INVOCATIONS_MODEL_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
# vLLM's body model -> (steered model, metrics label), as on the body's own route
_STEERED_INVOCATIONS = {
    CompletionRequest: STEERED_ROUTES["/v1/completions"],
    ChatCompletionRequest: STEERED_ROUTES["/v1/chat/completions"],
}


def _refusing_steering(original: Callable) -> Callable:
    async def endpoint(request: Any, raw_request: Request) -> Any:
        if STEERING_FIELD in (getattr(request, "model_extra", None) or {}):
            kind = type(request).__name__
            message = f"steering: not supported on {INVOCATIONS_PATH} for a {kind} body"
            rejection = Rejection(rejections.UNSUPPORTED_ROUTE, STEERING_FIELD, message)
            metrics.record_rejected(rejection.reason)
            return rejection.response_for(raw_request.url.path)
        return await original(request, raw_request)

    return endpoint


def _steered_invocation_types(types: list) -> list:
    """SageMaker's (request model, (handler getter, endpoint)) table with completion and chat
    bodies parsed by the steered models and admitted by the gate, and every other body (the
    pooling ones) refused when it carries `steering`."""
    steered = []
    for request_type, (get_handler, endpoint) in types:
        if request_type in _STEERED_INVOCATIONS:
            model, label = _STEERED_INVOCATIONS[request_type]
            steered.append((model, (get_handler, _steered_endpoint(endpoint, model, label))))
        else:
            steered.append((request_type, (get_handler, _refusing_steering(endpoint))))
    return steered


def steer_sagemaker_invocations() -> None:
    """Make SageMaker's `/invocations`, which dispatches on the body's shape to the generation
    and pooling endpoints, steer completion and chat bodies like their own routes do."""
    from vllm.entrypoints.serve.sagemaker import api_router as sagemaker

    def make(original: Callable) -> Callable:
        def invocation_types(*args: Any, **kwargs: Any) -> list:
            return _steered_invocation_types(original(*args, **kwargs))

        return invocation_types

    for name in ("get_generate_invocation_types", "get_pooling_invocation_types"):
        wrap_once(sagemaker, name, make)


def serves_sagemaker_invocations(app: FastAPI) -> bool:
    return any(
        isinstance(route, APIRoute) and route.path == INVOCATIONS_PATH for route in app.routes
    )


# --- command line ---------------------------------------------------------------------------


# This process's steering variants: a LoRA adapter loaded at runtime may not take their names.
_variant_names: set[str] = set()


def refuse_runtime_adapters_named_like(variant_names: Iterable[str]) -> None:
    """Make runtime LoRA loading (`/v1/load_lora_adapter` and SageMaker's adapter routes, under
    VLLM_ALLOW_RUNTIME_LORA_UPDATING) refuse a steering variant's name with a 400, as vLLM
    refuses a served model's: requests naming it would get the variant, never the adapter."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response

    _variant_names.update(variant_names)

    def make(original: Callable) -> Callable:
        async def _check_load_lora_adapter_request(self: Any, request: Any) -> Any:
            if request.lora_name in _variant_names:
                return create_error_response(
                    message=f"The lora adapter '{request.lora_name}' conflicts with a steering "
                    "variant: requests naming it get the variant (its model steered), never an "
                    "adapter; load the adapter under another name.",
                    err_type="InvalidUserInput",
                    status_code=HTTPStatus.BAD_REQUEST,
                )
            return await original(self, request)

        return _check_load_lora_adapter_request

    wrap_once(OpenAIServingModels, "_check_load_lora_adapter_request", make)


async def worker_steering_stats(request: Request) -> list[dict]:
    """Each worker's `sae_steering_stats` (sae_vllm.engine.worker.stats), of every engine this
    API server sends requests to, with its engine's data-parallel rank (`engine`, as vLLM's
    /metrics label it). The engine client's collective_rpc asks the first engine only."""
    engine_client = request.app.state.engine_client
    core = getattr(engine_client, "engine_core", None)
    # The engines call_utility_all_async asks, in its order; vLLM names each by its rank.
    engines = list(getattr(core, "core_engines", None) or ())
    ask_every_engine = getattr(core, "call_utility_all_async", None)
    if not engines or ask_every_engine is None:  # a client of another kind: one engine
        workers = await engine_client.collective_rpc("sae_steering_stats")
        return [{"engine": 0, **worker} for worker in workers]
    # The same call as collective_rpc's (method, timeout, args, kwargs), to every engine at once
    per_engine = await ask_every_engine("collective_rpc", "sae_steering_stats", None, (), None)
    return [
        {"engine": int.from_bytes(engine, "little"), **worker}
        for engine, workers in zip(engines, per_engine, strict=True)
        for worker in workers
    ]


def served_model_names(args: argparse.Namespace) -> list[str]:
    """The names vLLM's API server answers to for its model, first the one its responses name
    (its app state's rule: --served-model-name, else the model)."""
    return list(args.served_model_name or [args.model])


def lora_adapter_names(args: argparse.Namespace) -> list[str]:
    """The names of the LoRA adapters given on the command line (--lora-modules)."""
    return [module.name for module in getattr(args, "lora_modules", None) or []]


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """vLLM's own `serve` parser (every vLLM option). The model and --gpu-memory-utilization
    default to None, so that "not given" can be told apart (see `set_memory_default`)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # spawn workers, as `vllm serve` does
    parser = make_arg_parser(FlexibleArgumentParser(prog=prog, description=description))
    memory_default = parser.get_default("gpu_memory_utilization")
    parser.set_defaults(model=None, gpu_memory_utilization=None)
    parser.set_defaults(**{_MEMORY_DEFAULT: memory_default})
    return parser


def set_memory_default(args: argparse.Namespace, kv_cache_bytes: int | None = None) -> None:
    """Give --gpu-memory-utilization vLLM's default back; first, when `kv_cache_bytes` is set and
    no memory option was given, size the KV cache explicitly instead (small models on CPU,
    where that fraction reserves host RAM)."""
    given = (
        args.gpu_memory_utilization is not None
        or args.kv_cache_memory_bytes is not None
        or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    )
    if kv_cache_bytes and not given:
        args.kv_cache_memory_bytes = kv_cache_bytes
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = getattr(args, _MEMORY_DEFAULT)


def finish_args(args: argparse.Namespace) -> None:
    """What `vllm serve` does between parsing and serving; refuses the frontends that would
    not see the steering field (gRPC, the Rust frontend)."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.logger import configure_logging_from_args

    if args.model_tag is not None:
        args.model = args.model_tag
    if getattr(args, "grpc", False):
        raise ValueError("--grpc is not supported by sae-vllm serve (its requests cannot steer)")
    if envs.VLLM_USE_RUST_FRONTEND:
        raise ValueError(
            "VLLM_USE_RUST_FRONTEND is not supported by sae-vllm serve (its requests cannot steer)"
        )
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)


def model_shape(args: argparse.Namespace) -> tuple[int, int]:
    """(hidden size, number of decoder layers) of the model the args name, without loading it."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    model_config = AsyncEngineArgs.from_cli_args(args).create_model_config()
    return model_config.get_hidden_size(), model_config.get_total_num_hidden_layers()


APIServerCustomizer = Callable[[FastAPI, argparse.Namespace, Any], None]


def customize_every_app(customize: APIServerCustomizer) -> None:
    """Hand every app vLLM's API server builds in this process to `customize(app, args,
    model_config)` (model_config may be None), right after vLLM builds it (idempotent)."""
    from vllm.entrypoints.launchers.api_server import entry

    def make(original: Callable) -> Callable:
        def build_app(
            args: argparse.Namespace, supported_tasks: Any = None, model_config: Any = None
        ) -> FastAPI:
            app = original(args, supported_tasks, model_config)
            customize(app, args, model_config)
            return app

        return build_app

    wrap_once(entry, "build_app", make)


def run(args: argparse.Namespace) -> None:
    """Serve as `vllm serve` does (API server processes, headless engines, data parallel load
    balancing); each API server's app is customised through `customize_every_app`."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    ServeSubcommand.cmd(args)


# --- the app --------------------------------------------------------------------------------


GATE_STATE = "sae_steering_gate"  # the app's SteeringGate, on app.state
STORED_STATE = "sae_steering_stored_responses"  # the app's StoredResponses, on app.state
STORED_RESPONSE_PATH = "/v1/responses/{response_id}"


def _spec_field(from_variant: bool, from_xargs: bool) -> str:
    """Where a request's spec came from, as an error's `param` names it."""
    if from_variant:
        return "model"
    return XARGS_FIELD if from_xargs else STEERING_FIELD


def _engine_refusal(
    spec: str | None, message: str, param: str, raw_request: Request
) -> JSONResponse | None:
    """The 400 in the gate's shape, counted, when vLLM refused a steered request for its spec
    (see steering.engine_rejection; `message` is vLLM's error); None otherwise."""
    rejection = None if spec is None else engine_rejection(message, param)
    if rejection is None:
        return None
    metrics.record_rejected(rejection.reason)
    return rejection.response_for(raw_request.url.path)


def _remember_response(response: Response, raw_request: Request, steering: StoredSteering) -> None:
    """Remember a Responses API response's steering under its id: a client may fetch it again
    (GET /v1/responses/{id}). A stream names its id in its first event."""
    stored: StoredResponses = getattr(raw_request.app.state, STORED_STATE)

    def remember(response_id: str) -> None:
        stored.remember(response_id, steering)

    if isinstance(response, StreamingResponse):
        response.body_iterator = remembering_response_id(response.body_iterator, remember)
    elif (response_id := field_of(response.body, "id")) is not None:
        remember(response_id)


_EXPOSED_HEADERS = f"{STEERING_HEADER}, {UNREACHED_HEADER}"


def _say_steering(response: Response, raw_request: Request, steering: str) -> None:
    """Put X-SAE-Steering on a steering route's response, and for a browser's cross-origin
    request (it sends Origin) expose it and X-SAE-Steering-Unreached: a page's script can read
    no other header of such a response but the few CORS calls safe."""
    response.headers[STEERING_HEADER] = steering
    if "origin" in raw_request.headers:
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED_HEADERS


def _steered_endpoint(original: Callable, model: type, label: str):
    async def endpoint(request: Any, raw_request: Request) -> Any:
        gate: SteeringGate = getattr(raw_request.app.state, GATE_STATE)
        extra_body = (request.model_extra or {}).get("extra_body")
        from_xargs = xargs_spec_of(request.vllm_xargs) is not None
        variant = gate.variant_named(request.model)
        variant_name = request.model if variant is not None else None
        try:
            spec = gate.admit(request.steering, request.vllm_xargs, extra_body, variant_name)
        except Rejection as rejection:
            return rejection.response_for(raw_request.url.path)
        if variant is not None:
            request.model = variant.model  # vLLM serves the model; the spec steers it
        request.carry_steering(spec)
        param = _spec_field(variant is not None, from_xargs)
        try:
            with reach_report.tallying() as sequences:
                response = await original(request, raw_request)
        except VLLMValidationError as exc:  # some routes leave vLLM's errors to its handler
            refusal = _engine_refusal(spec, str(exc), param, raw_request)
            if refusal is None:
                raise
            return refusal
        if isinstance(response, Response) and response.status_code >= 400:
            # vLLM refused it (not counted as taken on): for its spec, the gate's 400
            if response.status_code == HTTPStatus.BAD_REQUEST:
                message = error_message_of(getattr(response, "body", b""))
                refusal = _engine_refusal(spec, message, param, raw_request)
                if refusal is not None:
                    return refusal
            return response
        taken_on = functools.partial(gate.record_admitted, label, spec, variant_name)
        if not isinstance(response, Response):
            taken_on()
            return response
        _say_steering(response, raw_request, UNSTEERED if spec is None else STEERED)
        if model is SteeredResponsesRequest:
            _remember_response(response, raw_request, StoredSteering(spec is not None, sequences))
        if isinstance(response, StreamingResponse):
            response.body_iterator = counting_once_taken(response.body_iterator, taken_on)
            if spec is not None:  # its sequences end after its headers are sent
                response.body_iterator = reporting_unreached(response.body_iterator, sequences)
            return response
        taken_on()
        if sequences.ended:  # not a background response, whose sequences end later
            response.headers[UNREACHED_HEADER] = str(sequences.unreached)
        return response

    endpoint.__name__ = original.__name__
    endpoint.__doc__ = original.__doc__
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model),
            inspect.Parameter(
                "raw_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
            ),
        ]
    )
    return endpoint


def _route_index(app: FastAPI, path: str, method: str) -> int:
    """Where in the app's route table vLLM's `method` route for `path` is."""
    for index, route in enumerate(app.router.routes):
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return index
    raise RuntimeError(f"vLLM's app has no {method} route for {path}")


def _replace_route(app: FastAPI, index: int, endpoint: Callable) -> None:
    """Put `endpoint` in place of the endpoint of the app's route at `index`, which keeps its
    path, methods, dependencies, place in the table and documentation."""
    routes = app.router.routes
    route = routes[index]
    app.router.add_api_route(
        route.path,
        endpoint,
        methods=sorted(route.methods),
        dependencies=route.dependencies,
        responses=route.responses,
        response_model=None,
        name=route.name,
        tags=route.tags,
        summary=route.summary,
        description=route.description,
        include_in_schema=route.include_in_schema,
    )
    routes[index] = routes.pop()


def install_steering_field(app: FastAPI, gate: SteeringGate) -> frozenset[str]:
    """Rebuild vLLM's generation routes around the steered request models: FastAPI
    parses and documents `steering`, the gate admits or refuses it, vLLM's handler runs.

    Returns the paths rebuilt: all of STEERED_ROUTES, or none when the model does not generate
    (vLLM serves pooling models without them); some but not all means vLLM changed."""
    setattr(app.state, GATE_STATE, gate)
    setattr(app.state, STORED_STATE, StoredResponses())
    found: set[str] = set()
    routes = app.router.routes
    for index, route in enumerate(list(routes)):
        if not (isinstance(route, APIRoute) and route.path in STEERED_ROUTES):
            continue
        if "POST" not in route.methods:
            continue
        model, label = STEERED_ROUTES[route.path]
        _replace_route(app, index, _steered_endpoint(route.endpoint, model, label))
        found.add(route.path)
    missing = set(STEERED_ROUTES) - found
    if found and missing:
        raise RuntimeError(f"vLLM's app has no POST route for {', '.join(sorted(missing))}")
    if found:
        _tell_stored_responses_steering(app)
    app.openapi_schema = None
    return frozenset(found)


def _tell_stored_responses_steering(app: FastAPI) -> None:
    """Make `GET /v1/responses/{id}` say what the response's POST would have: X-SAE-Steering,
    and for a steered one that has finished X-SAE-Steering-Unreached, or in its stream the
    closing event's count (see stream_report)."""
    index = _route_index(app, STORED_RESPONSE_PATH, "GET")
    original = app.router.routes[index].endpoint

    @functools.wraps(original)
    async def retrieve_responses(*args: Any, **kwargs: Any) -> Any:
        response = await original(*args, **kwargs)
        raw_request: Request = kwargs["raw_request"]
        stored: StoredResponses = getattr(raw_request.app.state, STORED_STATE)
        steering = stored.recall(kwargs["response_id"])
        if steering is None or not isinstance(response, Response) or response.status_code >= 400:
            return response
        _say_steering(response, raw_request, STEERED if steering.steered else UNSTEERED)
        if not steering.steered:
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = reporting_unreached(response.body_iterator, steering.sequences)
        elif field_of(response.body, "status") in FINISHED:
            response.headers[UNREACHED_HEADER] = str(steering.sequences.unreached)
        return response

    _replace_route(app, index, retrieve_responses)


MODELS_PATH = "/v1/models"


def list_steering_variants(app: FastAPI, variants: dict[str, tuple[str, dict]]) -> None:
    """Make `GET /v1/models` list each steering variant (name -> the served model it steers and
    its spec) after vLLM's own cards: a copy of that model's card, its `parent`, with the
    variant's name and its `steering` spec."""
    index = _route_index(app, MODELS_PATH, "GET")
    original = app.router.routes[index].endpoint

    @functools.wraps(original)
    async def show_available_models(raw_request: Request) -> Any:
        response = await original(raw_request)
        if not isinstance(response, Response) or response.status_code != 200:
            return response
        listing = json.loads(response.body)
        by_id = {card["id"]: card for card in listing["data"]}
        for name, (model, spec) in variants.items():
            card = {**by_id[model], "id": name, "parent": model, "steering": spec}
            listing["data"].append(card)
        return JSONResponse(content=listing)

    _replace_route(app, index, show_available_models)
