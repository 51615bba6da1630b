"""Persistent steering state: per-request rows of edit tables and the per-step token buffers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from .. import LOGGER_NAME
from ..kernels import OP_CODES
from ..spec import MAX_SCOPES, FeatureEdit, SteeringSpec
from .device_placement import DevicePlacement
from .scopes import UNBOUNDED, segments
from .staging import StagedRows, StagedTensor

logger = logging.getLogger(LOGGER_NAME)

NO_ROW = -1
MAX_EDGES = 2 * MAX_SCOPES  # each scope's span starts and ends once
ROWS_PER_REQUEST = 2 * MAX_SCOPES - 1  # distinct edit sets along one request's positions


class EditTable:
    """One SAE's per-row edit slots: feature ids (-1 = empty), values and op codes. Rows are
    written on the host and reach the device at the next `flush`."""

    def __init__(
        self, max_rows: int, max_edits: int, device: torch.device, staged: bool | None = None
    ):
        self.feature = torch.full((max_rows, max_edits), -1, dtype=torch.int32, device=device)
        self.value = torch.zeros((max_rows, max_edits), dtype=torch.float32, device=device)
        self.op = torch.zeros((max_rows, max_edits), dtype=torch.int32, device=device)
        self._rows = StagedRows((self.feature, self.value, self.op), staged)

    def write_row(self, row: int, features: list[int], values: list[float], ops: list[int]) -> None:
        """Fill the first slots of a row that is empty (new, or cleared since its last use):
        its other feature slots stay -1, which is all the kernels read of a slot."""
        n = len(features)
        if n == 0:
            return
        feature, value, op = self._rows.writable(row)
        feature[row, :n], value[row, :n], op[row, :n] = features, values, ops

    def clear_row(self, row: int) -> None:
        feature, _, _ = self._rows.writable(row)
        feature[row] = -1  # an empty feature slot is all the kernels look at

    def flush(self) -> None:
        self._rows.flush()


class SegmentTable:
    """Per request, under its first row: the sorted finite edges of its segments (padded with
    UNBOUNDED) and the row of each segment (segment j holds the positions with j edges at or
    below them; NO_ROW where nothing is steered). One entry more than there are rows: the
    last, read through NO_ROW (-1), steers nothing. Held on the host, or on the device
    (`device`, reached at the next `flush`) when the device places each token in its segment."""

    def __init__(self, max_rows: int, device: torch.device, staged: bool | None = None):
        self.edges = torch.full(
            (max_rows + 1, MAX_EDGES), UNBOUNDED, dtype=torch.int64, device=device
        )
        self.rows = torch.full(
            (max_rows + 1, MAX_EDGES + 1), NO_ROW, dtype=torch.int32, device=device
        )
        self._entries = StagedRows((self.edges, self.rows), staged)

    @property
    def host_edges(self) -> np.ndarray:
        return self._entries.host(0)

    @property
    def host_rows(self) -> np.ndarray:
        return self._entries.host(1)

    def write(self, first: int, edges: list[int], segment_rows: list[int]) -> None:
        """Entry `first`: the edges, and the row of the segment before the first edge (always
        NO_ROW) and after each edge."""
        padding = MAX_EDGES - len(edges)
        host_edges, host_rows = self._entries.writable(first)
        host_edges[first] = edges + [UNBOUNDED] * padding
        host_rows[first] = segment_rows + [NO_ROW] * padding

    def flush(self) -> None:
        self._entries.flush()


class SteeringTables:
    """Rows handed to steered requests, their edit tables per SAE, and the token->row map.

    A request is admitted the first time the runner schedules it and released when it
    finishes, is aborted or is preempted. At admission its positions are cut into segments
    where the set of edits in scope does not change (one segment for a spec with one scope);
    each distinct set gets a row, and the segment bounds are kept under the request's first
    row. Every step the token buffers are rewritten with vectorised numpy from the batch
    layout; rows past the step's tokens read -1. All of it is written on the host and reaches
    the device without a host-device sync (`staged`: through pinned host copies; default on
    CUDA devices).

    Where the host does not know a step's positions when it prepares it (`places_on_device`:
    vllm_adapter.positions_run_ahead), the host writes only `tok_first`, each token's request's
    first row, and the segment bounds go to the device, where DevicePlacement derives each
    token's row and scope from the positions the model reads; `tok_row` and `tok_scope` then
    stay unwritten."""

    def __init__(
        self,
        sae_ids: Sequence[str],
        max_rows: int,
        max_edits: int,
        max_tokens: int,
        device: torch.device,
        staged: bool | None = None,
        places_on_device: bool = False,
    ):
        self.tables = {sae_id: EditTable(max_rows, max_edits, device, staged) for sae_id in sae_ids}
        self.tok_row = torch.full((max_tokens,), NO_ROW, dtype=torch.int32, device=device)
        self.tok_scope = torch.zeros((max_tokens,), dtype=torch.bool, device=device)
        self.places_on_device = places_on_device
        if places_on_device:
            self.tok_first = torch.full((max_tokens,), NO_ROW, dtype=torch.int32, device=device)
            self.segments = SegmentTable(max_rows, device, staged)
            self._token_buffers = [(StagedTensor(self.tok_first, staged), NO_ROW)]
        else:
            self.segments = SegmentTable(max_rows, torch.device("cpu"), staged=False)
            self._token_buffers = [
                (StagedTensor(self.tok_row, staged), NO_ROW),
                (StagedTensor(self.tok_scope, staged), False),
            ]
        self.rows_total = max_rows
        self._free_rows = list(range(max_rows - 1, -1, -1))
        # Per request, under its first row: the position from which its tokens stay in one
        # segment for good.
        self._settles_at = np.zeros(max_rows + 1, dtype=np.int64)
        self._first_row_of: dict[str, int] = {}
        self._rows_of: dict[str, list[int]] = {}
        # A step compares positions with as many edges as the most any admitted request has
        # (at most two for a spec of one scope); counted again at a step after such a one leaves.
        self._edge_count_of: dict[str, int] = {}
        self._edges_in_use = 0
        self._recount_edges = False
        self._written_tokens = 0
        self._steady_layout: tuple | None = None
        self._steady_from = np.zeros(0, np.int32)  # its requests' positions when it settled

    def device_placement(self, positions: torch.Tensor) -> DevicePlacement:
        """The module that places each token on the device, from `positions` (the runner's)."""
        if not self.places_on_device:
            raise ValueError("these steering tables keep their segment bounds on the host")
        return DevicePlacement(positions, self.tok_first, self.segments.edges, self.segments.rows)

    @property
    def rows_in_use(self) -> int:
        return self.rows_total - len(self._free_rows)

    @property
    def rows_free(self) -> int:
        return len(self._free_rows)

    @property
    def requests_known(self) -> int:
        """Requests (steered or not) the tables still track; 0 once all have finished."""
        return len(self._first_row_of)

    def knows(self, req_id: str) -> bool:
        return req_id in self._first_row_of

    def admit(
        self,
        req_id: str,
        spec: SteeringSpec | None,
        num_prompt_tokens: int,
        generation_start: int | None = None,
    ) -> int:
        """Give a request its rows, fill their edit slots and fix the positions each edit
        steers; returns its first row (NO_ROW when it steers nothing).

        `generation_start` is the position of the first generated token when it is not the end
        of the request's prompt: a beam-search step re-submits the tokens generated so far as
        prompt, and they must still be scoped as generated."""
        if spec is None:
            return self._admit_unsteered(req_id)
        edges, segment_edits = segments(spec, num_prompt_tokens, generation_start)
        edit_sets = list(dict.fromkeys(edit_set for edit_set in segment_edits if edit_set))
        if not edit_sets:
            return self._admit_unsteered(req_id)  # its windows hold no position
        if len(edit_sets) > len(self._free_rows):
            raise RuntimeError("steering table exhausted: more steered requests than rows")
        self._steady_layout = None
        row_of = {edit_set: self._free_rows.pop() for edit_set in edit_sets}
        for edit_set, row in row_of.items():
            self._write_row(row, [spec.edits[index] for index in edit_set])
        first = row_of[edit_sets[0]]
        self.segments.write(
            first,
            edges,
            [NO_ROW] + [row_of[edit_set] if edit_set else NO_ROW for edit_set in segment_edits],
        )
        # Past its last finite edge, a token stays in one segment for good.
        self._settles_at[first] = edges[-1]
        self._first_row_of[req_id] = first
        self._rows_of[req_id] = list(row_of.values())
        self._edge_count_of[req_id] = len(edges)
        self._edges_in_use = max(self._edges_in_use, len(edges))
        return first

    def _admit_unsteered(self, req_id: str) -> int:
        self._first_row_of[req_id] = NO_ROW
        return NO_ROW

    def release(self, req_id: str) -> None:
        self._first_row_of.pop(req_id, None)
        rows = self._rows_of.pop(req_id, None)
        if not rows:
            return
        if self._edge_count_of.pop(req_id) == self._edges_in_use:
            self._recount_edges = True
        self._steady_layout = None
        for row in rows:
            for table in self.tables.values():
                table.clear_row(row)
            self._free_rows.append(row)

    def write_step(
        self,
        req_ids: Sequence[str],
        num_scheduled_tokens: np.ndarray,
        num_computed_tokens: np.ndarray,
    ) -> None:
        """Write the token->row map and scope mask for one step's batch (request order), and
        bring the edit tables' changed rows to the device. With `places_on_device`, write each
        token's first row instead; `num_computed_tokens` is not read."""
        for table in self.tables.values():
            table.flush()
        self.segments.flush()
        if self.rows_in_use == 0 and self._written_tokens == 0:
            return  # nothing steered now or in the last write: the buffers are all -1 already
        layout = (tuple(req_ids), num_scheduled_tokens.tobytes())
        # A position moves back without a release when vLLM recomputes a running request's
        # KV that failed to load (kv_load_failure_policy "recompute"): it may be unsettled.
        if layout == self._steady_layout and (
            self.places_on_device or (num_computed_tokens >= self._steady_from).all()
        ):
            return  # same batch, every token settled: the buffers already hold this step
        firsts = np.fromiter(
            (self._first_row_of.get(r, NO_ROW) for r in req_ids), np.int32, len(req_ids)
        )
        num_tokens = int(num_scheduled_tokens.sum())
        if not (firsts >= 0).any():
            self._write_tokens(0)
            return
        if self.places_on_device:
            # The first rows depend on the layout alone, so the same layout reuses them.
            self._write_tokens(num_tokens, np.repeat(firsts, num_scheduled_tokens))
            self._steady_layout = layout
            return
        token_req = np.repeat(np.arange(len(req_ids)), num_scheduled_tokens)
        first_token = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens
        positions = num_computed_tokens[token_req] + (
            np.arange(num_tokens) - first_token[token_req]
        )
        token_firsts = firsts[token_req]
        if self._recount_edges:
            self._edges_in_use = max(self._edge_count_of.values(), default=0)
            self._recount_edges = False
        # Each token's index into the segment rows: its request's entry, then one segment on for
        # each of the request's edges at or below its position.
        edges = self.segments.host_edges[token_firsts, : self._edges_in_use]
        segment_index = token_firsts * (MAX_EDGES + 1) + (positions[:, None] >= edges).sum(axis=1)
        token_rows = self.segments.host_rows.ravel()[segment_index]
        self._write_tokens(num_tokens, token_rows, token_rows != NO_ROW)
        # Once every token has settled, a step with the same batch layout has the same rows and
        # the same scope while no position moves back (each token stays in its segment), so it
        # can skip the write.
        if (positions >= self._settles_at[token_firsts]).all():
            self._steady_layout, self._steady_from = layout, num_computed_tokens.copy()

    def _write_row(self, row: int, edits: Sequence[FeatureEdit]) -> None:
        for sae_id, table in self.tables.items():
            own = [edit for edit in edits if edit.sae == sae_id]
            table.write_row(
                row,
                [edit.feature for edit in own],
                [edit.value or 0.0 for edit in own],
                [OP_CODES[edit.op.value] for edit in own],
            )

    def _write_tokens(self, count: int, *values: np.ndarray) -> None:
        """Token buffers (rows and scope, or first rows): `values` for the first `count` tokens,
        one array per buffer, and the buffer's empty value after them up to where the last
        write reached."""
        self._steady_layout = None  # the buffers no longer hold the step it names
        end = max(count, self._written_tokens)
        if end == 0:
            return
        if count:
            for (buffer, _), token_values in zip(self._token_buffers, values, strict=True):
                buffer.writable()[:count] = token_values
        for buffer, empty in self._token_buffers:
            buffer.writable()[count:end] = empty
            buffer.flush(0, end)
        self._written_tokens = count
