"""Feature label files: a labels JSON read into feature index -> label, top tokens, stats."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .protocol import TopToken


class LabelFileError(ValueError):
    """A labels file that cannot be read."""


class FeatureLabel(BaseModel):
    """The label and top tokens of one feature."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    label: str | None = Field(
        default=None, validation_alias=AliasChoices("label", "description", "explanation")
    )
    top_tokens: list[TopToken] | None = Field(
        default=None, validation_alias=AliasChoices("top_tokens", "tokens")
    )
    max_activation: float | None = None
    density: float | None = None

    @field_validator("top_tokens", mode="before")
    @classmethod
    def _normalise_tokens(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [_token(item) for item in value]


def _token(item: Any) -> Any:
    if isinstance(item, str):
        return {"token": item}
    if isinstance(item, list | tuple) and len(item) == 2:
        return {"token": item[0], "activation": item[1]}
    if isinstance(item, Mapping):
        token = next((item[k] for k in ("token", "text", "str") if k in item), None)
        activation = next(
            (item[k] for k in ("activation", "score", "value", "weight") if k in item), None
        )
        return {"token": token, "activation": activation}
    return item


def _index(key: Any, where: str) -> int:
    try:
        index = int(key)
    except (TypeError, ValueError):
        raise LabelFileError(f"{where}: feature index {key!r} is not an integer") from None
    if index < 0:
        raise LabelFileError(f"{where}: feature index {index} is negative")
    return index


def _entries(data: Any, where: str) -> list[tuple[int, Any]]:
    if isinstance(data, Mapping) and "features" in data:
        data = data["features"]
    if isinstance(data, Mapping):
        return [(_index(key, where), value) for key, value in data.items()]
    if isinstance(data, list):
        pairs = []
        for position, value in enumerate(data):
            key = position
            if isinstance(value, Mapping):
                key = next((value[k] for k in ("index", "feature", "id") if k in value), position)
            pairs.append((_index(key, where), value))
        return pairs
    raise LabelFileError(f"{where}: expected a JSON object or list of feature labels")


def read_labels(path: str | Path) -> dict[int, FeatureLabel]:
    """Feature index -> its label, from a labels JSON file.

    Accepted shapes (what label tools commonly write, the embedded model's included): a top-level
    object with a `features` key, or the feature collection itself; the collection is an object
    keyed by feature index or a list of entries (each with `index`/`feature`/`id`, else its
    position; null entries are skipped); an entry is a label string or an object with
    `label`/`description`/`explanation`, `top_tokens`/`tokens` (strings, [token, activation]
    pairs or objects with `token`/`text` and `activation`/`score`/`value`/`weight`), and
    optionally `max_activation` and `density`."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LabelFileError(f"{where}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise LabelFileError(f"{where}: not valid JSON ({exc})") from None
    labels: dict[int, FeatureLabel] = {}
    for index, value in _entries(data, where):
        if value is None:  # a feature without a label
            continue
        raw = {"label": value} if isinstance(value, str) else value
        try:
            labels[index] = FeatureLabel.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(part) for part in first["loc"])
            raise LabelFileError(
                f"{where}: feature {index}: {loc}: {first['msg']}".replace(": : ", ": ")
            ) from None
    return labels


def default_labels_path(sae_path: str | Path) -> Path | None:
    """The labels file that sits next to an SAE, if any: `labels.json` inside an SAE folder,
    or `<file>.labels.json` beside an SAE file."""
    path = Path(sae_path)
    candidate = path / "labels.json" if path.is_dir() else path.with_suffix(".labels.json")
    return candidate if candidate.is_file() else None
