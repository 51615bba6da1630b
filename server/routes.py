"""The SAE routes: GET /v1/saes, /v1/saes/{sae_id}/features and .../features/{index}, and the
workers' steering rows, GET /v1/steering/stats."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from sae_vllm.spec import SpecErrorReason, name_told

from .errors import error_response
from .protocol import ErrorResponse, FeatureInfo, FeatureList, SAEList, SteeringStats
from .registry import SAERecord, SAERegistry

router = APIRouter(tags=["SAE steering"])

REGISTRY_STATE = "sae_registry"


def registry_of(request: Request) -> SAERegistry:
    return getattr(request.app.state, REGISTRY_STATE)


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(request: Request) -> SAEList:
    """Every SAE requests can steer with."""
    return registry_of(request).listing()


def _unknown_sae(registry: SAERegistry, sae_id: str) -> JSONResponse:
    known = ", ".join(sorted(registry.sizes())) or "none"
    return error_response(
        HTTPStatus.NOT_FOUND,
        f"unknown SAE '{name_told(sae_id)}' (registered: {known})",
        "sae_id",
        SpecErrorReason.UNKNOWN_SAE,
    )


@router.get(
    "/v1/saes/{sae_id}/features",
    response_model=FeatureList,
    responses={HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse}},
)
async def search_features(
    sae_id: str,
    request: Request,
    q: str | None = Query(default=None, description="Text the label must contain (any case)."),
    limit: int = Query(default=20, ge=1, le=1000, description="Most features returned."),
) -> FeatureList | JSONResponse:
    """Labelled features whose label contains `q`, by index (every labelled one without `q`)."""
    registry = registry_of(request)
    record: SAERecord | None = registry.get(sae_id)
    if record is None:
        return _unknown_sae(registry, sae_id)
    return FeatureList(data=record.search(q, limit))


@router.get(
    "/v1/saes/{sae_id}/features/{index}",
    response_model=FeatureInfo,
    responses={HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse}},
)
async def get_feature(sae_id: str, index: int, request: Request) -> FeatureInfo | JSONResponse:
    """One feature: its decoder norm, and its label and top tokens when a label file exists."""
    registry = registry_of(request)
    record = registry.get(sae_id)
    if record is None:
        return _unknown_sae(registry, sae_id)
    feature = record.feature(index)
    if feature is None:
        return error_response(
            HTTPStatus.NOT_FOUND,
            f"feature {index} is out of range for SAE '{sae_id}' (d_sae {record.info.d_sae})",
            "index",
            SpecErrorReason.FEATURE_OUT_OF_RANGE,
        )
    return feature


@router.get("/v1/steering/stats", response_model=SteeringStats)
async def steering_stats(request: Request) -> SteeringStats:
    """Each worker's steering rows in use, free and in all: rows in use with no request
    running would be a leak."""
    from . import vllm_app  # imports vLLM's OpenAI layer, which this module's importers may lack

    return SteeringStats.model_validate({"data": await vllm_app.worker_steering_stats(request)})
