"""The OpenAI-compatible server: vLLM's own app plus the steering field, SAE routes and metrics."""
