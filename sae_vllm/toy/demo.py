"""`sae-vllm demo`: unsteered vs steered and ablated completions of the embedded default model."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

NEUTRAL_PROMPT = "i think that"


def engine_args(toy) -> tuple[dict[str, Any], dict[str, Any]]:
    """vLLM LLM(...) arguments serving the toy model with its SAE as steering config, and that
    config."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from sae_vllm import steering_config

    config = steering_config([{"id": toy.sae_id, "path": str(toy.sae_dir), "layer": toy.layer}])
    kwargs = {
        "model": str(toy.model_dir),
        "additional_config": config,
        "enforce_eager": True,
        "max_model_len": 128,
        "max_num_seqs": 64,
        "seed": 0,
    }
    return kwargs, config


def start_engine(toy):
    """A vLLM engine serving the toy model with its SAE, and its steering config."""
    from vllm import LLM

    kwargs, config = engine_args(toy)
    return LLM(**kwargs), config


Row = tuple[str, str, object]  # (label, prompt, SamplingParams)


# The toy's sentences name their topic early ("the <noun>", "i like the <adjective>"), so
# steering their first tokens picks the topic, and the model stays on it.
TOPIC_WINDOW = 4


def _spec(
    toy,
    feature: int,
    op: str,
    value: float | None = None,
    apply_to: str = "generated",
    window: dict | None = None,
):
    edit = {"sae": toy.sae_id, "feature": feature, "op": op}
    if value is not None:
        edit["value"] = value
    return {"edits": [edit], "apply_to": apply_to} | ({"window": window} if window else {})


def _print_rows(rows: list[Row], outputs) -> None:
    from sae_vllm.toy.corpus import classify

    width = max(len(label) for label, _, _ in rows)
    for (label, prompt, _), output in zip(rows, outputs, strict=True):
        for i, completion in enumerate(output.outputs):
            text = completion.text.strip()
            topic = classify(text) or "-"
            print(f"{label if i == 0 else '':<{width}}  [{topic:^9}]  {prompt} {text}")
        print()


def _positive(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-vllm demo", description=__doc__)
    parser.add_argument("--prompt", default=NEUTRAL_PROMPT)
    parser.add_argument("--samples", type=_positive, default=3, help="sampled completions per row")
    parser.add_argument("--max-tokens", type=_positive, default=12)
    args = parser.parse_args(argv)
    # The demo's one engine runs in this process: on CPU vLLM's engine-core and worker
    # processes, each importing vLLM, made a run take 46-47 s instead of 16-22 s.
    from sae_vllm.engine.vllm_adapter import MULTIPROCESSING_ENV

    os.environ.setdefault(MULTIPROCESSING_ENV, "0")

    from vllm import SamplingParams

    from sae_vllm import steering_params
    from sae_vllm.toy.build import ensure_built
    from sae_vllm.toy.steering_check import on_topic_prompt

    toy = ensure_built()
    topics = json.loads(toy.labels_path.read_text())["topics"]
    llm, config = start_engine(toy)
    sampling = {"temperature": 0.7, "max_tokens": args.max_tokens, "n": args.samples}
    unsteered = SamplingParams(**sampling)
    set_rows: list[Row] = [("unsteered", args.prompt, unsteered)]
    ablate_rows: list[Row] = []
    window_rows: list[Row] = []
    for topic, info in topics.items():
        feature, value = info["feature"], info["steering_value"]
        spec = _spec(toy, feature, "set", value)
        label = f"{topic} (feature {feature} = {value:.1f})"
        set_rows.append((label, args.prompt, steering_params(spec, config=config, **sampling)))
        spec = _spec(toy, feature, "set", value, window={"end": TOPIC_WINDOW})
        label = f"{topic}, first {TOPIC_WINDOW} tokens only"
        window_rows.append((label, args.prompt, steering_params(spec, config=config, **sampling)))
        spec = _spec(toy, feature, "ablate", apply_to="all")
        ablated = steering_params(spec, config=config, **sampling)
        prompt = on_topic_prompt(topic)
        ablate_rows.append((f"{topic}: unsteered", prompt, unsteered))
        ablate_rows.append((f"{topic}: ablate feature {feature}", prompt, ablated))
    rows = set_rows + window_rows + ablate_rows
    outputs = iter(
        llm.generate(
            [prompt for _, prompt, _ in rows], [params for _, _, params in rows], use_tqdm=False
        )
    )
    print(f"\nset: layer {toy.layer} SAE '{toy.sae_id}', temperature 0.7\n")
    _print_rows(set_rows, [next(outputs) for _ in set_rows])
    print(
        f'window: set for the first {TOPIC_WINDOW} generated tokens only ("window": '
        f'{{"end": {TOPIC_WINDOW}}}); the model stays on the topic they open\n'
    )
    _print_rows(window_rows, [next(outputs) for _ in window_rows])
    print("ablate: the prompt starts on the topic; its feature is ablated at every position\n")
    _print_rows(ablate_rows, [next(outputs) for _ in ablate_rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
