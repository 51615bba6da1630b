"""The embedded default: a toy language model and SAE that sae-vllm trains itself and caches."""

from sae_vllm.toy.build import RECIPE_VERSION, ToyArtifacts, ensure_built
from sae_vllm.toy.corpus import classify
from sae_vllm.toy.grammar import TOPIC_NAMES
from sae_vllm.toy.steering_check import NEUTRAL_PROMPT

__all__ = [
    "NEUTRAL_PROMPT",
    "RECIPE_VERSION",
    "TOPIC_NAMES",
    "ToyArtifacts",
    "classify",
    "ensure_built",
]
