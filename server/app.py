"""Turn the app vLLM builds into the steering server: the steering field and the SAE routes."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from fastapi import FastAPI

from sae_vllm import LOGGER_NAME
from sae_vllm.config import SteeringConfig, steering_config_from
from sae_vllm.engine import reach_report
from sae_vllm.spec import SpecLimits

from . import metrics, vllm_app
from .middleware_order import add_innermost_middleware
from .registry import SAERegistry
from .routes import REGISTRY_STATE, router
from .steering import SteeringGate, resolve_variants
from .steering_elsewhere import RefuseSteeringElsewhere

logger = logging.getLogger(LOGGER_NAME + ".server")

# `sae-vllm serve` checks its SAEs before the engine starts and leaves the result on its args,
# so the app does not read them a second time; `vllm serve` has no such step.
PREPARED_STATE_ARG = "_sae_vllm_prepared_state"


def steering_gate(
    config: SteeringConfig | None, registry: SAERegistry, args: argparse.Namespace
) -> SteeringGate:
    """The gate that admits specs against the registry's SAEs, within the config's limits, and
    the config's steering variants of the model `args` serve."""
    if config is None:
        return SteeringGate(registry.sizes(), SpecLimits())
    from sae_vllm.engine.sae_sizes import sae_sizes

    sae_sizes(config)  # warm the plugin's own size cache (it re-checks specs in this process)
    served = vllm_app.served_model_names(args)
    variants = resolve_variants(
        config.variants,
        served[0],
        [*served, *vllm_app.lora_adapter_names(args)],
        registry.sizes(),
        config.limits,
    )
    return SteeringGate(registry.sizes(), config.limits, variants)


def customize(app: FastAPI, registry: SAERegistry, gate: SteeringGate) -> bool:
    """Add the steering field, the SAE routes and the refusals to vLLM's app; returns whether
    it steers (False for a model that does not generate, whose app has no generation routes)."""
    setattr(app.state, REGISTRY_STATE, registry)
    steered_paths = vllm_app.install_steering_field(app, gate)
    invocations = vllm_app.serves_sagemaker_invocations(app)
    self_checked = (vllm_app.INVOCATIONS_PATH,) if invocations else ()
    model_headers = (
        {vllm_app.INVOCATIONS_PATH: vllm_app.INVOCATIONS_MODEL_HEADER} if invocations else {}
    )
    app.include_router(router)
    if steered_paths and gate.variants:
        cards = {name: (v.model, json.loads(v.spec)) for name, v in gate.variants.items()}
        vllm_app.list_steering_variants(app, cards)
        vllm_app.refuse_runtime_adapters_named_like(gate.variants)
        metrics.export_variants(gate.variants)
    refusals = {
        "steered_paths": steered_paths,
        "self_checked_paths": self_checked,
        "model_headers": model_headers,
        "variants": gate.variants,
        "routes": app.router.routes,
    }
    add_innermost_middleware(app, RefuseSteeringElsewhere, refusals)
    return bool(steered_paths)


def _customize_built_app(app: FastAPI, args: argparse.Namespace, model_config: Any) -> None:
    state = getattr(args, PREPARED_STATE_ARG, None)
    if state is None:  # `vllm serve`: the engine has started with this config already
        config = steering_config_from(getattr(args, "additional_config", None))
        registry = SAERegistry.load(config)
        if model_config is not None:
            registry.check_model(
                model_config.get_hidden_size(), model_config.get_total_num_hidden_layers()
            )
        state = (registry, steering_gate(config, registry, args))
    served = ", ".join(state[0].sizes()) or "none configured"
    if customize(app, *state):
        logger.info("sae-vllm: the steering API is on (SAEs: %s)", served)
        for name, variant in state[1].variants.items():
            logger.info(
                "sae-vllm: model '%s' is '%s' steered with %s", name, variant.model, variant.spec
            )
    else:
        logger.info("sae-vllm: the model does not generate; steering is refused (SAEs: %s)", served)


def install() -> None:
    """Teach vLLM's OpenAI layer in this process the `steering` field: every app its API
    server builds gets the steering routes and checks (SageMaker's /invocations included), its
    own request models hand the field to the engine instead of dropping it, and `vllm
    run-batch` fails lines that carry it where it cannot apply."""
    reach_report.add_unreached_listener(metrics.record_unreached)
    vllm_app.carry_steering_extra_field()
    vllm_app.refuse_misplaced_steering_in_batch_lines()
    vllm_app.install_steered_beam_search()
    vllm_app.check_responses_reach_before_streaming()
    vllm_app.answer_messages_refusals_quietly()
    vllm_app.steer_sagemaker_invocations()
    vllm_app.customize_every_app(_customize_built_app)
