"""The SAEs the server steers with, as the API process sees them: sizes, decoder norms, labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from sae_vllm.config import SAEEntry, SteeringConfig
from sae_vllm.sae import SAEFormatError, decoder_norms, non_finite_weight
from sae_vllm.sae.sites import model_misfit
from sae_vllm.sae_entries import SAEEntryError, checked_entry

from .errors import StartupError
from .labels import FeatureLabel, LabelFileError, default_labels_path, read_labels
from .protocol import FeatureInfo, SAEInfo, SAEList


@dataclass(frozen=True)
class SAERecord:
    """What the routes and the request check need of one SAE (its weights are not kept)."""

    info: SAEInfo
    decoder_norms: np.ndarray  # [d_sae] float32
    labels: dict[int, FeatureLabel] = field(default_factory=dict)

    def feature(self, index: int) -> FeatureInfo | None:
        """The feature's description, or None when the index is out of range."""
        if not 0 <= index < self.info.d_sae:
            return None
        label = self.labels.get(index)
        return FeatureInfo(
            sae=self.info.id,
            index=index,
            decoder_norm=float(self.decoder_norms[index]),
            label=label.label if label else None,
            top_tokens=label.top_tokens if label else None,
            max_activation=label.max_activation if label else None,
            density=label.density if label else None,
        )

    def search(self, query: str | None, limit: int) -> list[FeatureInfo]:
        """Up to `limit` labelled features, by index, whose label contains `query` (any case;
        None matches every labelled feature)."""
        needle = query.casefold() if query else None
        found: list[FeatureInfo] = []
        for index in sorted(self.labels):
            label = self.labels[index].label
            if needle is None or (label is not None and needle in label.casefold()):
                feature = self.feature(index)
                if feature is not None:
                    found.append(feature)
                    if len(found) == limit:
                        break
        return found


def load_record(entry: SAEEntry) -> SAERecord:
    """Read one configured SAE (and its labels); a problem raises a one-line StartupError."""
    where = f"SAE '{entry.id}'"
    try:
        sae, layer, path = checked_entry(entry, layer_hint="use --sae ID=PATH@LAYER")
        # The worker refuses one too, but only once the model has loaded, in vLLM's traceback
        bad = non_finite_weight(path, format=entry.format)
        if bad is not None:
            raise SAEFormatError(f"{path}: {bad} is NaN or infinite")
        norms = decoder_norms(path, format=entry.format).numpy()
    except SAEEntryError as exc:
        raise StartupError(str(exc)) from None
    except SAEFormatError as exc:
        raise StartupError(f"{where}: {exc}") from None
    labels_path = entry.labels or default_labels_path(path)
    labels: dict[int, FeatureLabel] = {}
    if labels_path is not None:
        try:
            labels = read_labels(labels_path)
        except LabelFileError as exc:
            raise StartupError(f"{where}: labels {exc}") from None
    info = SAEInfo(
        id=entry.id,
        layer=layer,
        architecture=sae.architecture,
        k=sae.k,
        format=sae.format,
        hook_name=sae.hook_name,
        dtype=sae.dtype_name,
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        has_labels=bool(labels),
    )
    return SAERecord(info=info, decoder_norms=norms, labels=labels)


class SAERegistry:
    """The registered SAEs by id."""

    def __init__(self, records: Iterable[SAERecord] = ()):
        self._records = {record.info.id: record for record in records}

    @classmethod
    def load(cls, config: SteeringConfig | None) -> SAERegistry:
        return cls(load_record(entry) for entry in (config.saes if config else ()))

    def get(self, sae_id: str) -> SAERecord | None:
        return self._records.get(sae_id)

    def sizes(self) -> dict[str, int]:
        """SAE id -> d_sae, what resolve_spec checks feature indexes against."""
        return {sae_id: record.info.d_sae for sae_id, record in self._records.items()}

    def listing(self) -> SAEList:
        return SAEList(data=[record.info for record in self._records.values()])

    def check_model(self, hidden_size: int, num_layers: int) -> None:
        """Refuse SAEs that do not fit the served model (the worker would refuse them later)."""
        for record in self._records.values():
            info = record.info
            misfit = model_misfit(info.d_in, info.layer, hidden_size, num_layers)
            if misfit is not None:
                raise StartupError(f"SAE '{info.id}': {misfit}")
