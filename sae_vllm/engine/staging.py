"""Device tensors the host rewrites every step without waiting for the GPU: writes go to a host
copy (pinned memory on CUDA) that reaches the device with one non-blocking copy per flush."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class StagedTensor:
    """A device tensor and the host copy the host writes it through.

    A plain `device_tensor.copy_(cpu_tensor)` blocks until the GPU has finished everything
    queued before it; under vLLM's async scheduling that is the previous step's forward, so the
    next step's preparation would stop overlapping it. Here the copy is queued behind that work
    and the host returns at once. Before the host copy is written again, `writable` waits for
    the last copy out of it to finish (normally long done: the runner waits for the previous
    step's input copies before preparing the next).

    On a CPU device the host copy is the tensor itself and `flush` does nothing, unless
    `staged=True`, which runs the staged path on CPU (for its tests)."""

    def __init__(self, device_tensor: torch.Tensor, staged: bool | None = None):
        self.device_tensor = device_tensor
        self.staged = device_tensor.is_cuda if staged is None else staged
        if self.staged:
            host = torch.empty(
                device_tensor.shape, dtype=device_tensor.dtype, pin_memory=device_tensor.is_cuda
            )
            host.copy_(device_tensor)  # once, at load
        else:
            host = device_tensor
        self._host = host
        self._host_array = host.numpy()
        self._copied = torch.cuda.Event() if device_tensor.is_cuda else None
        self._copy_in_flight = False

    @property
    def host(self) -> np.ndarray:
        """The host copy as a numpy array, to read (a copy in flight only reads it too)."""
        return self._host_array

    def writable(self) -> np.ndarray:
        """The host copy as a numpy array, safe to write."""
        if self._copy_in_flight:
            assert self._copied is not None
            # query() first: when the copy is done (the usual case) nothing synchronises at all.
            if not self._copied.query():
                self._copied.synchronize()
            self._copy_in_flight = False
        return self._host_array

    def flush(self, start: int = 0, stop: int | None = None) -> None:
        """Queue the copy of rows [start, stop) of the host copy to the device (stream-ordered
        before every kernel launched after it)."""
        if not self.staged:
            return
        stop = self.device_tensor.shape[0] if stop is None else stop
        if start >= stop:
            return
        pinned = self._copied is not None
        self.device_tensor[start:stop].copy_(self._host[start:stop], non_blocking=pinned)
        if pinned:
            self._copied.record()
            self._copy_in_flight = True


class StagedRows:
    """Device tensors of the same rows that the host rewrites a row at a time: the rows written
    since the last `flush` reach the device then, in one copy per tensor."""

    def __init__(self, device_tensors: Sequence[torch.Tensor], staged: bool | None = None):
        self._tensors = [StagedTensor(tensor, staged) for tensor in device_tensors]
        self._staged = any(tensor.staged for tensor in self._tensors)
        self._hosts = [tensor.host for tensor in self._tensors]  # always writable when unstaged
        self._num_rows = device_tensors[0].shape[0]
        self._dirty = (self._num_rows, 0)  # rows [lo, hi) written since the last flush

    def host(self, index: int) -> np.ndarray:
        """Tensor `index`'s host copy, to read."""
        return self._tensors[index].host

    def writable(self, row: int) -> list[np.ndarray]:
        """Every tensor's host copy, safe to write, `row` marked for the next flush."""
        lo, hi = self._dirty
        self._dirty = (min(lo, row), max(hi, row + 1))
        if not self._staged:
            return self._hosts
        return [tensor.writable() for tensor in self._tensors]

    def flush(self) -> None:
        lo, hi = self._dirty
        if lo < hi:
            for tensor in self._tensors:
                tensor.flush(lo, hi)
            self._dirty = (self._num_rows, 0)
