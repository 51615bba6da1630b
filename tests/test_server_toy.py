"""`sae-vllm serve` with no model: the embedded model, its SAE and labels, steered by topic."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.server

SAMPLES = 16


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    from sae_vllm.server.process import ServerProcess

    log = tmp_path_factory.mktemp("toy-server") / "server.log"
    # what `make serve` runs, minus compile
    with ServerProcess(["--enforce-eager"], log) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def test_serves_the_embedded_model_and_sae(server, client, toy):
    from sae_vllm.server.launch import TOY_SERVED_NAME

    # The model, then one steering variant per topic: its feature set to its steering value.
    cards = client.models.list().data
    assert [m.id for m in cards] == [TOY_SERVED_NAME] + [
        f"{TOY_SERVED_NAME}-{topic}" for topic in toy.topics
    ]
    for card, (topic, info) in zip(cards[1:], toy.topics.items(), strict=True):
        (edit,) = card.model_dump()["steering"]["edits"]
        assert (edit["feature"], edit["op"], edit["value"]) == (
            info["feature"], "set", info["steering_value"]
        ), topic  # fmt: skip
    saes = httpx.get(f"{server.base_url}/v1/saes").json()["data"]
    assert len(saes) == 1
    assert saes[0]["id"] == toy.sae_id and saes[0]["layer"] == toy.layer
    assert saes[0]["has_labels"] is True
    log = server.log_path.read_text(errors="replace")  # the operator sees what is steered
    assert f"sae-vllm: SAE '{toy.sae_id}' (relu, d_sae" in log
    assert f"steers the residual stream after layer {toy.layer}" in log
    assert f"sae-vllm: the steering API is on (SAEs: {toy.sae_id})" in log


def test_topic_features_carry_their_labels(server, toy):
    for topic, info in toy.topics.items():
        url = f"{server.base_url}/v1/saes/{toy.sae_id}/features/{info['feature']}"
        feature = httpx.get(url).json()
        assert feature["label"] == f"topic: {topic}"
        assert feature["top_tokens"] and feature["max_activation"] > 0
        found = httpx.get(
            f"{server.base_url}/v1/saes/{toy.sae_id}/features", params={"q": topic.upper()}
        ).json()["data"]
        assert info["feature"] in [f["index"] for f in found]
        assert all(topic in f["label"] for f in found)


def test_steering_toward_a_topic_moves_samples_there(client, toy):
    from sae_vllm.server.launch import TOY_SERVED_NAME
    from sae_vllm.toy.corpus import classify
    from sae_vllm.toy.demo import NEUTRAL_PROMPT

    def texts_of(steering: dict | None, model: str = TOY_SERVED_NAME) -> list[str]:
        response = client.completions.create(
            model=model, prompt=NEUTRAL_PROMPT, max_tokens=12, temperature=0.7, n=SAMPLES,
            seed=0, extra_body={"steering": steering} if steering else None,
        )  # fmt: skip
        return [choice.text for choice in response.choices]

    plain = [classify(text) for text in texts_of(None)]
    shares = {}
    for topic, info in toy.topics.items():
        edit = {"feature": info["feature"], "op": "set", "value": info["steering_value"]}
        texts = texts_of({"edits": [edit]})  # one SAE: the id may be left out
        # the topic's steering variant samples the same (same seed, same spec)
        assert texts_of(None, f"{TOY_SERVED_NAME}-{topic}") == texts, topic
        steered = [classify(text) for text in texts]
        shares[topic] = (steered.count(topic) / SAMPLES, plain.count(topic) / SAMPLES)
    assert all(steered > unsteered for steered, unsteered in shares.values()), shares
    assert all(steered >= 0.5 for steered, _ in shares.values()), shares


def test_an_sae_given_the_embedded_saes_id_is_refused_saying_so(toy):
    """It said only "duplicate SAE ids: toy", naming no SAE the user had given twice."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sae_vllm.cli", "serve", "--sae", f"{toy.sae_id}={toy.sae_dir}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"sae-vllm serve: error: --sae {toy.sae_id}=...: '{toy.sae_id}' is the id of the embedded "
        "default model's SAE, which it serves too; give yours another id"
    )
