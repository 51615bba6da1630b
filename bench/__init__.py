"""sae-vllm benchmarks: `python -m bench {overhead,latency,kernels,ci}`."""
