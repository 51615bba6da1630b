"""The toy word-level tokenizer, written as a transformers PreTrainedTokenizerFast folder."""

from __future__ import annotations

import json
from pathlib import Path

from sae_vllm.toy.grammar import VOCABULARY

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
MODEL_MAX_LENGTH = 128

# Chat turns are just the messages' words run together after BOS: the toy model knows no roles,
# so a chat request behaves like a completion of the user's text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}"
    "{% if not loop.last %} {% endif %}{% endfor %}"
)


def vocab() -> dict[str, int]:
    """Token -> id: the four specials first, then the grammar's words in a fixed order."""
    return {tok: i for i, tok in enumerate((*SPECIALS, *VOCABULARY))}


def build_tokenizer():  # -> tokenizers.Tokenizer
    """Lower-cases, splits words from punctuation, maps words to ids and prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    # WordPiece's decoder joins words with spaces (no "##" pieces occur here).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(SPECIALS))
    return tok


def save_tokenizer(directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIALS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
    }
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
