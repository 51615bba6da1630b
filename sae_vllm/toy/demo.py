"""`sae-vllm demo`: unsteered vs steered completions of the embedded default model, side by side."""

from __future__ import annotations

import argparse
import json
import os

NEUTRAL_PROMPT = "i think that"


def start_engine(toy):
    """A vLLM engine serving the toy model with its SAE registered as steering config."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from sae_vllm import steering_config

    config = steering_config([{"id": toy.sae_id, "path": str(toy.sae_dir), "layer": toy.layer}])
    return LLM(
        model=str(toy.model_dir),
        additional_config=config,
        enforce_eager=True,
        max_model_len=128,
        max_num_seqs=64,
        seed=0,
    ), config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-vllm demo", description=__doc__)
    parser.add_argument("--prompt", default=NEUTRAL_PROMPT)
    parser.add_argument("--samples", type=int, default=3, help="sampled completions per row")
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    from vllm import SamplingParams

    from sae_vllm import steering_params
    from sae_vllm.toy.build import ensure_built
    from sae_vllm.toy.corpus import classify

    toy = ensure_built()
    topics = json.loads(toy.labels_path.read_text())["topics"]
    llm, config = start_engine(toy)
    sampling = {"temperature": 0.7, "max_tokens": args.max_tokens, "n": args.samples}
    rows: list[tuple[str, object]] = [("unsteered", SamplingParams(**sampling))]
    for topic, info in topics.items():
        spec = {
            "edits": [
                {
                    "sae": toy.sae_id,
                    "feature": info["feature"],
                    "op": "set",
                    "value": info["steering_value"],
                }
            ]
        }
        label = f"{topic} (feature {info['feature']} = {info['steering_value']:.1f})"
        rows.append((label, steering_params(spec, config=config, **sampling)))
    outputs = llm.generate(
        [args.prompt] * len(rows), [params for _, params in rows], use_tqdm=False
    )
    width = max(len(label) for label, _ in rows)
    print(f"\nprompt: {args.prompt!r}   (layer {toy.layer} SAE '{toy.sae_id}', temperature 0.7)\n")
    for (label, _), output in zip(rows, outputs, strict=True):
        for i, completion in enumerate(output.outputs):
            text = completion.text.strip()
            topic = classify(text) or "-"
            print(f"{label if i == 0 else '':<{width}}  [{topic:^9}]  {args.prompt} {text}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
