"""sae-vllm benchmarks: `python -m bench SUITE`, the suites listed in bench/__main__.py."""
