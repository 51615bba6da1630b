"""Turn the app vLLM builds into the steering server: the steering field and the SAE routes."""

from __future__ import annotations

from fastapi import FastAPI

from . import vllm_app
from .registry import SAERegistry
from .routes import REGISTRY_STATE, router
from .steering import SteeringGate
from .steering_elsewhere import RefuseSteeringElsewhere


def customize(app: FastAPI, registry: SAERegistry, gate: SteeringGate) -> None:
    setattr(app.state, REGISTRY_STATE, registry)
    vllm_app.install_steering_field(app, gate)
    vllm_app.install_steered_beam_search()
    app.include_router(router)
    steered_paths = tuple(vllm_app.STEERED_ROUTES)
    if app.middleware_stack is None:
        app.add_middleware(RefuseSteeringElsewhere, steered_paths=steered_paths)
    else:
        # vLLM has already built the middleware stack (add_middleware would refuse); wrap it.
        app.middleware_stack = RefuseSteeringElsewhere(app.middleware_stack, steered_paths)
