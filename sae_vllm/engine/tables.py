"""Persistent steering state: per-request rows of edit tables and the per-step token buffers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..kernels import OP_CODES
from ..spec import ApplyTo, SteeringSpec

logger = logging.getLogger("sae_vllm")

NO_ROW = -1
_SCOPE_CODES = {ApplyTo.GENERATED: 0, ApplyTo.ALL: 1, ApplyTo.PROMPT: 2}
_UNBOUNDED = np.iinfo(np.int64).max


class EditTable:
    """One SAE's per-row edit slots: feature ids (-1 = empty), values and op codes."""

    def __init__(self, max_rows: int, max_edits: int, device: torch.device):
        self.feature = torch.full((max_rows, max_edits), -1, dtype=torch.int32, device=device)
        self.value = torch.zeros((max_rows, max_edits), dtype=torch.float32, device=device)
        self.op = torch.zeros((max_rows, max_edits), dtype=torch.int32, device=device)

    def write_row(self, row: int, features: list[int], values: list[float], ops: list[int]) -> None:
        slots = self.feature.shape[1]
        pad = slots - len(features)
        self.feature[row].copy_(torch.tensor(features + [-1] * pad, dtype=torch.int32))
        self.value[row].copy_(torch.tensor(values + [0.0] * pad, dtype=torch.float32))
        self.op[row].copy_(torch.tensor(ops + [0] * pad, dtype=torch.int32))

    def clear_row(self, row: int) -> None:
        self.feature[row].fill_(-1)


class SteeringTables:
    """Rows handed to steered requests, their edit tables per SAE, and the token->row map.

    A request gets a row the first time the runner schedules it and gives it back when it
    finishes, is aborted or is preempted. Every step the token buffers are rewritten with
    vectorised numpy from the batch layout; rows past the step's tokens read -1."""

    def __init__(
        self,
        sae_ids: Sequence[str],
        max_rows: int,
        max_edits: int,
        max_tokens: int,
        device: torch.device,
    ):
        self.tables = {sae_id: EditTable(max_rows, max_edits, device) for sae_id in sae_ids}
        self.tok_row = torch.full((max_tokens,), NO_ROW, dtype=torch.int32, device=device)
        self.tok_scope = torch.zeros((max_tokens,), dtype=torch.bool, device=device)
        self.rows_total = max_rows
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._row_scope = np.zeros(max_rows, dtype=np.int8)
        self._row_of: dict[str, int] = {}
        self._written_tokens = 0
        self._steady_layout: tuple | None = None

    @property
    def rows_in_use(self) -> int:
        return sum(1 for row in self._row_of.values() if row != NO_ROW)

    @property
    def rows_free(self) -> int:
        return len(self._free_rows)

    @property
    def requests_known(self) -> int:
        """Requests (steered or not) the tables still track; 0 once all have finished."""
        return len(self._row_of)

    def knows(self, req_id: str) -> bool:
        return req_id in self._row_of

    def admit(self, req_id: str, spec: SteeringSpec | None) -> int:
        """Give a request its row (NO_ROW when it is not steered) and fill its edit slots."""
        if spec is None:
            self._row_of[req_id] = NO_ROW
            return NO_ROW
        if not self._free_rows:
            raise RuntimeError("steering table exhausted: more steered requests than rows")
        row = self._free_rows.pop()
        self._steady_layout = None
        for sae_id, table in self.tables.items():
            edits = [edit for edit in spec.edits if edit.sae == sae_id]
            table.write_row(
                row,
                [edit.feature for edit in edits],
                [edit.value or 0.0 for edit in edits],
                [OP_CODES[edit.op.value] for edit in edits],
            )
        self._row_scope[row] = _SCOPE_CODES[spec.apply_to]
        self._row_of[req_id] = row
        return row

    def release(self, req_id: str) -> None:
        row = self._row_of.pop(req_id, NO_ROW)
        if row == NO_ROW:
            return
        self._steady_layout = None
        for table in self.tables.values():
            table.clear_row(row)
        self._free_rows.append(row)

    def write_step(
        self,
        req_ids: Sequence[str],
        num_scheduled_tokens: np.ndarray,
        num_computed_tokens: np.ndarray,
        num_prompt_tokens: np.ndarray,
    ) -> None:
        """Write the token->row map and scope mask for one step's batch (request order)."""
        layout = (tuple(req_ids), num_scheduled_tokens.tobytes())
        if layout == self._steady_layout:
            return  # same batch, all past their prompts: the buffers already hold this step
        rows = np.fromiter((self._row_of.get(r, NO_ROW) for r in req_ids), np.int32, len(req_ids))
        num_tokens = int(num_scheduled_tokens.sum())
        if not (rows >= 0).any():
            self._reset_tokens(0)
            return
        token_req = np.repeat(np.arange(len(req_ids)), num_scheduled_tokens)
        first_token = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens
        positions = num_computed_tokens[token_req] + (
            np.arange(num_tokens) - first_token[token_req]
        )
        scope = self._row_scope[rows]
        prompt_len = num_prompt_tokens.astype(np.int64)
        lo = np.where(scope == _SCOPE_CODES[ApplyTo.GENERATED], prompt_len - 1, 0)
        hi = np.where(scope == _SCOPE_CODES[ApplyTo.PROMPT], prompt_len, _UNBOUNDED)
        token_rows = rows[token_req]
        in_scope = (token_rows >= 0) & (positions >= lo[token_req]) & (positions < hi[token_req])
        self.tok_row[:num_tokens].copy_(torch.from_numpy(token_rows))
        self.tok_scope[:num_tokens].copy_(torch.from_numpy(in_scope))
        self._reset_tokens(num_tokens)
        # Once every token is past its prompt, a step with the same batch layout has the same
        # rows and the same scope (generated/all: in, prompt: out), so it can skip the write.
        past_prompt = bool((positions >= prompt_len[token_req]).all())
        self._steady_layout = layout if past_prompt else None

    def _reset_tokens(self, keep: int) -> None:
        if self._written_tokens > keep:
            self.tok_row[keep : self._written_tokens].fill_(NO_ROW)
            self.tok_scope[keep : self._written_tokens].fill_(False)
        self._written_tokens = keep
