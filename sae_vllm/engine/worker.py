"""Worker side of the plugin: load SAEs onto the model at startup and refresh buffers each step."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .. import LOGGER_NAME
from ..config import EXTRA_ARGS_KEY, SteeringConfig, steering_config_from
from ..kernels import warm_up_cpu_path
from ..sae import SAEFormatError, open_sae
from ..sae.sites import NotALayerOutputError, layer_override, model_misfit, steered_layer
from ..spec import SteeringSpec
from . import vllm_adapter as vllm
from .intake import generation_start_of
from .sae_sizes import config_resolver
from .sae_weights import steering_weights
from .steered_layer import SAESteering, steer_layer
from .tables import ROWS_PER_REQUEST, SteeringTables

logger = logging.getLogger(LOGGER_NAME)

_STATE_ATTR = "_sae_steering_state"


class SteeringStartupError(ValueError):
    """The steering config cannot be applied to this model (bad file, size or layer)."""


class WorkerSteering:
    """The steering state of one model runner: SAE weights on the device, the edit tables and
    the per-step token buffers, and the bookkeeping of which request holds which row."""

    def __init__(self, config: SteeringConfig, runner: Any):
        info = vllm.runner_info(runner)
        self.sae_sizes: dict[str, int] = {}
        max_rows = 2 * info.max_num_seqs * ROWS_PER_REQUEST
        places_on_device = vllm.positions_run_ahead(vllm.vllm_config_of(runner))
        self.tables = SteeringTables(
            [entry.id for entry in config.saes],
            max_rows=max_rows,
            max_edits=config.max_edits,
            max_tokens=info.max_num_tokens,
            device=info.device,
            places_on_device=places_on_device,
        )
        placement = (
            self.tables.device_placement(vllm.model_positions(runner)) if places_on_device else None
        )
        layers = vllm.decoder_layers(runner, info.num_layers)
        for entry in config.saes:
            try:
                opened = open_sae(entry.path, format=entry.format)
            except SAEFormatError as exc:
                raise SteeringStartupError(f"SAE '{entry.id}': {exc}") from None
            sae = opened.header  # W_enc and W_dec stay in the file until steering_weights
            try:
                layer_index = steered_layer(sae, entry.layer)
            except NotALayerOutputError as exc:
                raise SteeringStartupError(f"SAE '{entry.id}': {exc}") from None
            if layer_index is None:
                raise SteeringStartupError(
                    f"SAE '{entry.id}': no layer given and none found in {entry.path}"
                )
            override = layer_override(sae, entry.layer)
            if override is not None:
                logger.warning("sae-vllm: SAE '%s' is %s", entry.id, override)
            misfit = model_misfit(sae.d_in, layer_index, info.hidden_size, info.num_layers)
            if misfit is not None:
                raise SteeringStartupError(f"SAE '{entry.id}': {misfit}")
            layer = layers[layer_index]
            if vllm.is_missing_layer(layer):
                continue  # another pipeline rank holds this layer
            try:
                weights = steering_weights(opened, dtype=info.dtype, device=info.device)
            except ValueError as exc:  # SAEFormatError too: a bad block, a non-finite weight
                raise SteeringStartupError(f"SAE '{entry.id}': {exc}") from None
            steering = SAESteering(
                entry.id,
                weights,
                self.tables.tables[entry.id],
                self.tables.tok_row,
                self.tables.tok_scope,
                placement,
            )
            steer_layer(layer, steering)
            self.sae_sizes[entry.id] = sae.d_sae
            logger.info(
                "sae-vllm: SAE '%s' (%s, d_sae %d) steers the residual stream after layer %d",
                entry.id,
                sae.architecture,
                sae.d_sae,
                layer_index,
            )
        # Against every configured SAE, not only this rank's: under pipeline parallelism a spec
        # may also edit SAEs another rank holds, and this rank still steers its own.
        self.resolver = config_resolver(config)
        if vllm.speculative_method(runner) == "draft_model":
            # Outputs stay exact (the target verifies every draft); only the acceptance rate
            # of steered requests drops, which a user tuning speculative decoding should know.
            logger.info(
                "sae-vllm: the draft model is not steered (the SAEs edit the target's layers), "
                "so steered requests accept fewer of its drafts"
            )
        if places_on_device:
            logger.info(
                "sae-vllm: this engine schedules asynchronously with speculative decoding, so "
                "each token's steering is placed on the device from the model's positions"
            )
        if info.device.type == "cpu":  # compile the CPU op's loop now, not in the first step
            warm_up_cpu_path(info.dtype)

    def release_rows(self, scheduler_output: Any) -> None:
        """Give back the rows of requests that left the batch, and forget the steering of a
        streaming-input session whose next chunk arrived: it may bring another spec (or none),
        and is admitted anew in prepare_step. Positions its earlier chunks computed keep theirs."""
        for req_id in vllm.departed_req_ids(scheduler_output):
            self.tables.release(req_id)
        for req_id in vllm.new_req_ids(scheduler_output):
            self.tables.release(req_id)

    def prepare_step(self, runner: Any, num_scheduled_tokens: np.ndarray) -> None:
        batch = vllm.step_batch(runner, num_scheduled_tokens)
        for index, req_id in enumerate(batch.req_ids):
            if not self.tables.knows(req_id):
                spec, generation_start = self._steering_of(runner, req_id)
                num_prompt_tokens = int(batch.num_prompt_tokens[index])
                self.tables.admit(req_id, spec, num_prompt_tokens, generation_start)
        self.tables.write_step(batch.req_ids, batch.num_scheduled_tokens, batch.num_computed_tokens)

    def _steering_of(self, runner: Any, req_id: str) -> tuple[SteeringSpec | None, int | None]:
        """The request's spec and generation start (see SteeringTables.admit)."""
        extra_args = vllm.request_extra_args(runner, req_id)
        data = extra_args.get(EXTRA_ARGS_KEY) if extra_args else None
        if data is None:
            return None, None
        try:
            return self.resolver.resolve(data).spec, generation_start_of(extra_args)
        except ValueError as exc:  # a SteeringSpecError or a bad generation start
            # The engine core rejects bad specs before they get here; this is the last guard.
            logger.error(
                "sae-vllm: request %s has an invalid steering spec, not steered: %s", req_id, exc
            )
            return None, None


def stats(runner: Any) -> dict[str, Any]:
    """Row-table occupancy of this worker (the `sae_steering_stats` RPC)."""
    state = state_of(runner)
    if state is None:
        return {"enabled": False}
    tables = state.tables
    return {
        "enabled": True,
        "saes": sorted(state.sae_sizes),
        "rows_in_use": tables.rows_in_use,
        "rows_free": tables.rows_free,
        "rows_total": tables.rows_total,
        "requests_known": tables.requests_known,
    }


def after_load_model(runner: Any) -> None:
    config = steering_config_from(vllm.vllm_config_of(runner).additional_config)
    if config is None:
        return
    vllm.check_frontend_carries_steering()
    setattr(runner, _STATE_ATTR, WorkerSteering(config, runner))


def after_update_states(runner: Any, scheduler_output: Any) -> None:
    state = state_of(runner)
    if state is not None:
        state.release_rows(scheduler_output)


def before_forward(runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> None:
    state = state_of(runner)
    if state is not None:
        state.prepare_step(runner, num_scheduled_tokens)


def state_of(runner: Any) -> WorkerSteering | None:
    """The runner's steering state (None when steering is off); for tests and RPCs."""
    return getattr(runner, _STATE_ATTR, None)
