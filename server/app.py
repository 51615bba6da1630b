"""Turn the app vLLM builds into the steering server: the steering field and the SAE routes."""

from __future__ import annotations

from fastapi import FastAPI

from . import vllm_app
from .registry import SAERegistry
from .routes import REGISTRY_STATE, router
from .steering import SteeringGate


def customize(app: FastAPI, registry: SAERegistry, gate: SteeringGate) -> None:
    setattr(app.state, REGISTRY_STATE, registry)
    vllm_app.install_steering_field(app, gate)
    app.include_router(router)
