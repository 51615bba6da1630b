"""The SAE routes: GET /v1/saes and GET /v1/saes/{sae_id}/features/{index}."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sae_vllm.spec import SpecErrorReason

from .errors import error_response
from .protocol import ErrorResponse, FeatureInfo, SAEList
from .registry import SAERegistry

router = APIRouter(tags=["SAE steering"])

REGISTRY_STATE = "sae_registry"


def registry_of(request: Request) -> SAERegistry:
    return getattr(request.app.state, REGISTRY_STATE)


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(request: Request) -> SAEList:
    """Every SAE requests can steer with."""
    return registry_of(request).listing()


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
        known = ", ".join(sorted(registry.sizes())) or "none"
        return error_response(
            HTTPStatus.NOT_FOUND,
            f"unknown SAE '{sae_id}' (registered: {known})",
            "sae_id",
            SpecErrorReason.UNKNOWN_SAE,
        )
    feature = record.feature(index)
    if feature is None:
        return error_response(
            HTTPStatus.NOT_FOUND,
            f"feature {index} is out of range for SAE '{sae_id}' (d_sae {record.info.d_sae})",
            "index",
            SpecErrorReason.FEATURE_OUT_OF_RANGE,
        )
    return feature
