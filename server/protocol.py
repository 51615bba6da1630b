"""Wire formats of the server's own responses: OpenAI- and Anthropic-style errors, SAE routes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorInfo(BaseModel):
    """The `error` object of an OpenAI-style error response."""

    message: str
    type: str
    param: str | None = None
    code: int = Field(description="The HTTP status, as in vLLM's own errors.")
    reason: str | None = Field(
        default=None,
        description="Why steering was refused, as a short code (e.g. `feature_out_of_range`); "
        "the same code labels the `sae_steering_rejected_specs_total` metric.",
    )


class ErrorResponse(BaseModel):
    """An OpenAI-style error response body."""

    error: ErrorInfo


class AnthropicErrorInfo(BaseModel):
    """The `error` object of an Anthropic-style error response (the /v1/messages routes)."""

    type: str
    message: str
    param: str | None = None
    reason: str | None = Field(default=None, description="As in `ErrorInfo.reason`.")


class AnthropicErrorResponse(BaseModel):
    """An Anthropic-style error response body."""

    type: Literal["error"] = "error"
    error: AnthropicErrorInfo


class WebSocketErrorEvent(BaseModel):
    """An error event on a websocket (vLLM's /v1/realtime shape: `{"type": "error", "error",
    "code"}`), with the refused field as `param`; the connection stays open."""

    type: Literal["error"] = "error"
    error: str
    code: str = Field(description="Why steering was refused, as in `ErrorInfo.reason`.")
    param: str | None = None


class SAEInfo(BaseModel):
    """One SAE the server steers with."""

    model_config = ConfigDict(frozen=True)

    object: Literal["sae"] = "sae"
    id: str = Field(description="The id requests name in `steering.edits[].sae`.")
    layer: int = Field(description="The decoder layer whose output the SAE steers.")
    architecture: str = Field(description="relu, jumprelu or topk.")
    k: int | None = Field(default=None, description="Features kept per token (topk only).")
    format: str = Field(description="The file format it was read from (e.g. saelens).")
    hook_name: str | None = Field(
        default=None, description="The hook the SAE was trained on, when its files name one."
    )
    dtype: str = Field(description="The dtype of its weights in the file.")
    d_in: int = Field(description="The width of the residual stream the SAE reads.")
    d_sae: int = Field(description="The number of features; valid indexes are [0, d_sae).")
    has_labels: bool = Field(description="Whether feature labels are available.")


class SAEList(BaseModel):
    """Every SAE the server steers with."""

    object: Literal["list"] = "list"
    data: list[SAEInfo]


class TopToken(BaseModel):
    """A token the feature fires on most, with its activation when known."""

    token: str
    activation: float | None = None


class FeatureInfo(BaseModel):
    """One SAE feature: its decoder direction's norm and, when known, its label."""

    object: Literal["sae.feature"] = "sae.feature"
    sae: str
    index: int
    decoder_norm: float = Field(description="L2 norm of the feature's decoder row W_dec[index].")
    label: str | None = None
    top_tokens: list[TopToken] | None = None
    max_activation: float | None = Field(
        default=None, description="Largest activation seen when labelling (a scale for values)."
    )
    density: float | None = Field(
        default=None, description="Fraction of labelled tokens the feature fired on."
    )


class WorkerSteeringStats(BaseModel):
    """One worker's steering rows: each steered request holds rows while it runs (one per
    distinct set of edits along its positions) and gives them back when it ends."""

    engine: int = Field(
        default=0, description="Its engine's data-parallel rank (the `engine` label on /metrics)."
    )
    enabled: bool = Field(description="Whether this worker steers (its engine has SAEs).")
    saes: list[str] = Field(default_factory=list, description="The SAEs on its layers.")
    rows_in_use: int = Field(default=0, description="Rows held by running steered requests.")
    rows_free: int = 0
    rows_total: int = 0
    requests_known: int = Field(
        default=0, description="Requests (steered or not) it still tracks; 0 once all end."
    )


class SteeringStats(BaseModel):
    """The steering rows of every worker (one per tensor/pipeline rank) of every engine the
    API server sends requests to (one per data-parallel rank)."""

    object: Literal["list"] = "list"
    data: list[WorkerSteeringStats]


class FeatureList(BaseModel):
    """Labelled features of one SAE whose label matches a search, by index."""

    object: Literal["list"] = "list"
    data: list[FeatureInfo]
