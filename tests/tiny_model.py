"""Test fixtures: tiny random-weight models that vLLM and HF both load, and random SAEs for them."""

from __future__ import annotations

import json
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HIDDEN = 128
LAYERS = 4
VOCAB = 384
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def _tiny_config(family: str):
    """A 4-layer config of `family` at hidden 128 that vLLM and HF both load."""
    import transformers

    shared = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    decoder = shared | {
        "hidden_size": HIDDEN,
        "intermediate_size": 256,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    gemma = {"sliding_window": 4096, "query_pre_attn_scalar": 64, "tie_word_embeddings": True}
    configs = {
        "llama": lambda: transformers.LlamaConfig(**decoder),
        "qwen3": lambda: transformers.Qwen3Config(**decoder),
        "gemma2": lambda: transformers.Gemma2Config(**decoder | gemma),
        "gemma3": lambda: transformers.Gemma3TextConfig(**decoder | gemma),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **decoder, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64
        ),
        "glm4_moe": lambda: transformers.Glm4MoeConfig(
            **decoder,
            moe_intermediate_size=64,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            partial_rotary_factor=0.5,
            num_nextn_predict_layers=1,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            **shared, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=512, n_inner=256
        ),
    }
    return configs[family]()


CAUSAL_LM_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _spread_weights(module: torch.nn.Module, expert_stacks: bool = False) -> None:
    """Redraw the module's weight matrices, and with `expert_stacks` its 3-D stacks of expert
    matrices, from N(0, 0.08): larger weights than the default init make greedy decoding varied."""
    dims = (2, 3) if expert_stacks else (2,)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() in dims:
                param.normal_(0.0, 0.08)


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A 4-layer Llama (hidden 128, head_dim 64) with a word-level tokenizer."""
    return build_tiny_model(directory, "llama", seed)


def build_tiny_model(directory: Path, family: str, seed: int = 0) -> Path:
    """A 4-layer random-weight model of `family` (hidden 128) with a word-level tokenizer."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _tiny_config(family)
    config.torch_dtype = "float32"
    model = getattr(transformers, CAUSAL_LM_CLASSES[family])(config)
    _spread_weights(model)
    model.save_pretrained(directory, safe_serialization=True)
    _word_tokenizer().save_pretrained(directory)
    return directory


def build_tiny_paligemma2(directory: Path, text_dir: Path) -> Path:
    """A PaliGemma 2 (a one-layer SigLIP tower around a Gemma 2) whose language model is the
    tiny Gemma 2 in `text_dir`, weight for weight, so that model is its text-only reference."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    text = transformers.AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32)
    vision = transformers.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text.config.to_dict(),
        image_token_index=VOCAB - 1,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    config.torch_dtype = "float32"
    model = transformers.PaliGemmaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.save_pretrained(directory, safe_serialization=True)
    side = vision.image_size
    image_processor = transformers.SiglipImageProcessor(size={"height": side, "width": side})
    image_processor.image_seq_length = (vision.image_size // vision.patch_size) ** 2
    tokenizer = _word_tokenizer(
        {"\n": VOCAB - 2, "<image>": VOCAB - 1}, extra_special_tokens={"image_token": "<image>"}
    )
    transformers.PaliGemmaProcessor(image_processor, tokenizer).save_pretrained(directory)
    return directory


def build_tiny_eagle_head(directory: Path, target_dir: Path, method: str, seed: int = 0) -> Path:
    """A random-weight draft head for the tiny Llama in `target_dir`, as vLLM loads it for
    `method`. "eagle" (`EagleLlamaForCausalLM`): one decoder layer without its input norm after
    `fc`, which maps [token embedding, the target's last hidden state] to the layer's input; the
    embedding and LM head are the target's. "eagle3" (`Eagle3LlamaForCausalLM`): `fc` maps the
    outputs of the target's layers 0-2 to one hidden state, and one decoder layer attends over
    [normed embedding, normed hidden state], with a norm and an LM head of its own. Random,
    their drafts are mostly rejected."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    architecture = {"eagle": "EagleLlamaForCausalLM", "eagle3": "Eagle3LlamaForCausalLM"}[method]
    config = json.loads((target_dir / "config.json").read_text())
    config |= {"architectures": [architecture], "num_hidden_layers": 1}
    if method == "eagle3":  # the outputs of layers 0-2 (vLLM's default picks are for deep models)
        config["eagle_aux_hidden_state_layer_ids"] = [1, 2, 3]
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(_tiny_config("llama"), 0)
    _spread_weights(layer)
    layer_weights = layer.state_dict()
    if method == "eagle":
        weights = {
            f"layers.0.{name}": w
            for name, w in layer_weights.items()
            if not name.startswith("input_layernorm.")
        }
        weights["fc.weight"] = torch.randn(HIDDEN, 2 * HIDDEN) * 0.08
    else:
        for projection in ("q_proj", "k_proj", "v_proj"):  # they read [embedding, hidden state]
            name = f"self_attn.{projection}.weight"
            layer_weights[name] = torch.randn(layer_weights[name].shape[0], 2 * HIDDEN) * 0.08
        weights = {f"midlayer.{name}": w for name, w in layer_weights.items()}
        weights["midlayer.hidden_norm.weight"] = torch.ones(HIDDEN)
        weights["fc.weight"] = torch.randn(HIDDEN, 3 * HIDDEN) * 0.08
        weights["norm.weight"] = torch.ones(HIDDEN)
        weights["lm_head.weight"] = torch.randn(VOCAB, HIDDEN) * 0.08
    save_file(weights, directory / "model.safetensors")
    return directory


def build_tiny_glm4_moe_with_mtp(directory: Path, seed: int = 0) -> Path:
    """A 4-layer GLM-4.5-style MoE model (layer 0 dense, then 4 routed experts and a shared one)
    whose checkpoint also holds one multi-token-prediction layer, `model.layers.4`, as GLM-4.5's
    releases do: an MoE decoder layer after `eh_proj`, which maps [normed token embedding, normed
    hidden state] to its input, with the model's LM head. vLLM's `mtp` proposer drafts with it;
    HF, like vLLM's target, ignores that layer. Random, its drafts are mostly rejected."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = _tiny_config("glm4_moe")
    config.num_hidden_layers = LAYERS + 1  # the MTP layer's weights come from a fifth layer
    config.torch_dtype = "float32"
    model = transformers.Glm4MoeForCausalLM(config)
    _spread_weights(model, expert_stacks=True)
    with tempfile.TemporaryDirectory() as saved:  # in the released layout: experts one by one
        model.save_pretrained(saved, safe_serialization=True)
        weights = {}
        for shard in Path(saved).glob("*.safetensors"):
            weights |= load_file(shard)
    mtp = f"model.layers.{LAYERS}"
    weights[f"{mtp}.eh_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN) * 0.08
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        weights[f"{mtp}.{norm}.weight"] = torch.ones(HIDDEN)
    config.num_hidden_layers = LAYERS
    config.save_pretrained(directory)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    _word_tokenizer().save_pretrained(directory)
    return directory


def _word_tokenizer(specials: dict[str, int] | None = None, **tokenizer_kwargs):
    """A whitespace word-level tokenizer over WORDS; `specials` take over the ids they name."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = specials or {}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    vocab = {w: i for w, i in vocab.items() if i not in specials.values()} | specials
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        **tokenizer_kwargs,
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


@dataclass(eq=False)
class RawSAE:
    """The raw arrays of an SAE as written to disk (float64 copies for the oracle)."""

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None
    k: int | None
    apply_b_dec_to_input: bool
    layer: int

    def pre(self, h: np.ndarray) -> np.ndarray:
        x = h - self.b_dec if self.apply_b_dec_to_input else h
        return x @ self.W_enc + self.b_enc

    def encode(self, h: np.ndarray) -> np.ndarray:
        pre = self.pre(h)
        if self.threshold is not None:
            return np.maximum(pre, 0) * (pre > self.threshold)
        if self.k is not None:
            kth = -np.partition(-pre, self.k - 1, axis=-1)[..., self.k - 1 : self.k]
            return np.where(pre >= kth, np.maximum(pre, 0), 0.0)
        return np.maximum(pre, 0)


def write_random_sae(
    directory: Path, architecture: str, layer: int, d_sae: int = 256, seed: int = 1
) -> RawSAE:
    """A random SAE in SAELens v6 format whose features fire on the tiny model's residuals."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, HIDDEN)) / np.sqrt(HIDDEN)
    W_enc = W_dec.T * 1.5 + 0.05 * rng.standard_normal((HIDDEN, d_sae))
    b_enc = -0.1 + 0.05 * rng.standard_normal(d_sae)
    b_dec = 0.05 * rng.standard_normal(HIDDEN)
    threshold = (
        np.abs(0.2 + 0.05 * rng.standard_normal(d_sae)) if architecture == "jumprelu" else None
    )
    k = 16 if architecture == "topk" else None
    apply_b_dec = architecture != "jumprelu"
    tensors = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
    } | ({"threshold": threshold} if threshold is not None else {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            name: torch.tensor(value, dtype=torch.float32).contiguous()
            for name, value in tensors.items()
        },
        directory / "sae_weights.safetensors",
    )
    cfg = {
        "architecture": {"relu": "standard"}.get(architecture, architecture),
        "d_in": HIDDEN,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "hook_name": f"blocks.{layer}.hook_resid_post"},
    } | ({"k": k} if k else {})
    (directory / "cfg.json").write_text(json.dumps(cfg))
    as64 = {
        name: torch.tensor(value, dtype=torch.float32).double().numpy()
        for name, value in tensors.items()
    }
    return RawSAE(
        as64["W_enc"],
        as64["b_enc"],
        as64["W_dec"],
        as64["b_dec"],
        as64.get("threshold"),
        k,
        apply_b_dec,
        layer,
    )


def stand_in_vllm_config(directory: Path, sae_id: str = "a", d_sae: int = 64):
    """What the plugin's frontend hooks read of a vLLM config (its `additional_config`, and
    whether it schedules asynchronously with speculative decoding: here not), with one random
    SAE at layer 1 written to `directory`."""
    from sae_vllm import steering_config

    write_random_sae(directory, "relu", layer=1, d_sae=d_sae)
    config = steering_config([{"id": sae_id, "path": str(directory), "layer": 1}])
    return types.SimpleNamespace(
        additional_config=config,
        scheduler_config=types.SimpleNamespace(async_scheduling=False),
        speculative_config=None,
    )


# The tests' LoRA adapter: rank, alpha and the layers it adapts (write_lora_and_merged)
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_and_merged(model_dir: Path, adapter_dir: Path, merged_dir: Path, seed: int = 7):
    """A PEFT-format LoRA on every linear layer of the tiny Llama, and the model with it merged
    (in float64) as the oracle's checkpoint."""
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(seed)
    base = load_file(model_dir / "model.safetensors")
    adapter: dict[str, torch.Tensor] = {}
    merged = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    merged_state = merged.state_dict()
    for name, weight in base.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if module not in LORA_TARGETS:
            continue
        out_features, in_features = weight.shape
        lora_a = torch.from_numpy(rng.normal(0.0, 0.1, (LORA_RANK, in_features))).float()
        lora_b = torch.from_numpy(rng.normal(0.0, 0.1, (out_features, LORA_RANK))).float()
        prefix = "base_model.model." + name.removesuffix(".weight")
        adapter[f"{prefix}.lora_A.weight"] = lora_a
        adapter[f"{prefix}.lora_B.weight"] = lora_b
        delta = (LORA_ALPHA / LORA_RANK) * (lora_b.double() @ lora_a.double())
        merged_state[name].add_(delta)
    adapter_dir.mkdir(parents=True)
    save_file(adapter, adapter_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(LORA_TARGETS),
        "base_model_name_or_path": str(model_dir),
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    merged.save_pretrained(merged_dir, safe_serialization=True)
