"""The embedded default: build quality bars, file formats, labels, HF steering, caching rules.

The full toy is taken from the real cache through ensure_built() (which honours SAE_VLLM_CACHE):
the first session on a machine builds it (a few minutes, on one core), later sessions
reuse it, and the engine tests share the same cache. Caching, reproducibility and the
recipe-version rule are checked on quick builds (same code, toy sizes) in a temporary cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_vllm.toy import NEUTRAL_PROMPT, TOPIC_NAMES, ToyArtifacts, build, classify, ensure_built
from sae_vllm.toy.batches import encode_passages, switch_masks
from sae_vllm.toy.corpus import SwitchPassage, sample_switch_passages
from sae_vllm.toy.grammar import determined_positions
from sae_vllm.toy.sae_training import decoder_overlap
from sae_vllm.toy.steering_check import (
    FeatureEdit,
    measure_ablation,
    sample_completions,
    steering_hook,
)
from sae_vllm.toy.topic_injection import Intervention


@pytest.fixture(scope="module")
def hf_model(toy: ToyArtifacts):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(toy.model_dir).eval()


@pytest.fixture(scope="module")
def sae_weights(toy: ToyArtifacts) -> dict[str, torch.Tensor]:
    return load_file(str(toy.sae_dir / "sae_weights.safetensors"))


# --- quality bars --------------------------------------------------------------------------


def test_model_accuracy_on_determined_positions(toy: ToyArtifacts) -> None:
    assert toy.metrics["determined_positions"] > 1000
    assert toy.metrics["determined_accuracy"] >= 0.8


def test_sae_explained_variance_and_l0(toy: ToyArtifacts) -> None:
    assert toy.metrics["explained_variance"] >= 0.8
    assert 0 < toy.metrics["l0"] < toy.metrics["d_sae"] / 8


def test_every_topic_has_a_feature_with_high_auroc(toy: ToyArtifacts) -> None:
    topics = toy.metrics["topics"]
    assert set(topics) == set(TOPIC_NAMES)
    assert len({t["feature"] for t in topics.values()}) == len(TOPIC_NAMES)
    for t in topics.values():
        assert t["auroc"] >= 0.9
        assert t["steered_share"] >= 0.8


def test_build_measured_that_ablating_each_topic_feature_lowers_its_share(toy) -> None:
    for topic, t in toy.metrics["topics"].items():
        assert t["ablation_share_before"] >= 0.8, topic
        assert t["ablation_share_after"] <= t["ablation_share_before"] - 0.4, topic


@pytest.mark.parametrize(("second_ablates", "chosen"), [(True, 2), (False, 1)])
def test_choose_prefers_the_feature_whose_ablation_removes_the_topic(
    monkeypatch, second_ablates, chosen
) -> None:
    """Of two features that steer about equally well, the one whose ablation removes the topic
    (a toy trained on an AVX2 CPU had this: steering 0.97 + 0.84 against 0.95 + 0.84, and only
    the second one's ablation lowered the share, 1.00 -> 0.22 against 1.00 -> 1.00); with
    neither ablating, the better steering one. The measurements are replaced by those figures
    (the real ones need a trained toy, and which case a build meets depends on the CPU it
    trains on); the decision is choose's own."""
    from sae_vllm.toy import calibration
    from sae_vllm.toy.labels import TopicFeature
    from sae_vllm.toy.progress import Progress
    from sae_vllm.toy.steering_check import SteeringResult

    steering = {
        1: (1.5, SteeringResult(30.0, 0.97, 0.84)),
        2: (0.5, SteeringResult(12.0, 0.95, 0.84)),
    }
    ablation = {1: 1.0, 2: 0.22 if second_ablates else 0.9}  # shares after, from 1.0
    monkeypatch.setattr(
        calibration, "_smallest_sufficient", lambda m, s, l, tf, r: steering[tf.feature]
    )
    # feature_edit hands the feature's index on as its "edit"; None is the unsteered prompt.
    monkeypatch.setattr(calibration, "feature_edit", lambda sae, feature, value: feature)
    monkeypatch.setattr(
        calibration,
        "on_topic_share",
        lambda m, l, feature, topic, n, seed: 1.0 if feature is None else ablation[feature],
    )
    monkeypatch.setattr(
        calibration, "measure", lambda m, l, feature, t, n, seed: steering[feature][1]
    )
    candidates = [TopicFeature("animals", f, 1.0, 0.9, 20.0) for f in (1, 2)]
    recipe = calibration.CalibrationRecipe()
    result = calibration.choose(None, None, 1, candidates, recipe, Progress(False))
    assert result.feature.feature == chosen
    assert result.multiple == steering[chosen][0]


# --- files -----------------------------------------------------------------------------------


def test_model_folder_loads_in_hf_with_the_required_shape(toy: ToyArtifacts, hf_model) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (toy.model_dir / name).is_file(), name
    config = json.loads((toy.model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["tie_word_embeddings"] is False
    assert config["max_position_embeddings"] == 128
    assert next(hf_model.parameters()).dtype == torch.float32


def test_tokenizer_adds_bos_and_has_a_chat_template(toy: ToyArtifacts) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    ids = tok("I think that the rain is cold.").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "i think that the rain is cold ."
    assert tok.eos_token == "</s>"
    config = json.loads((toy.model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "i think that"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>i think that"


def test_sae_folder_is_saelens_v6(toy: ToyArtifacts, sae_weights) -> None:
    cfg = json.loads((toy.sae_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["hook_name"] == f"blocks.{toy.layer}.hook_resid_post"
    assert cfg["metadata"]["prepend_bos"] is True
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    assert {k: tuple(v.shape) for k, v in sae_weights.items()} == shapes
    assert all(v.dtype == torch.float32 for v in sae_weights.values())


def test_sae_reconstructs_the_hf_residual_at_its_hook(toy: ToyArtifacts, hf_model, sae_weights):
    """hidden_states[L + 1] is the SAE's site: there it reconstructs well (fp64 EV)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.model_dir)
    ids = tok(
        [
            "today the rain is cold . the snow falls .",
            "i like the spicy soup a lot . the bread is fresh .",
        ],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = hf_model(**ids, output_hidden_states=True)
    x = out.hidden_states[toy.layer + 1][ids.attention_mask.bool()].double()[1:]
    w = {k: v.double() for k, v in sae_weights.items()}
    a = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    err = a @ w["W_dec"] + w["b_dec"] - x
    ev = 1 - err.pow(2).sum(1).mean() / (x.pow(2).sum(1).mean() - x.mean(0).pow(2).sum())
    assert ev > 0.8


def test_labels_file(toy: ToyArtifacts) -> None:
    labels = json.loads(toy.labels_path.read_text())
    d_sae = toy.metrics["d_sae"]
    assert labels["sae_id"] == toy.sae_id == "toy"
    assert labels["layer"] == toy.layer
    assert len(labels["features"]) == d_sae
    assert [f["index"] for f in labels["features"]] == list(range(d_sae))
    for topic in TOPIC_NAMES:
        entry = labels["topics"][topic]
        assert 0 <= entry["feature"] < d_sae
        assert entry["auroc"] >= 0.9
        assert entry["typical_max"] > 0
        assert entry["steering_value"] == pytest.approx(
            entry["steering_multiple"] * entry["typical_max"], rel=1e-5
        )
        row = labels["features"][entry["feature"]]
        assert row["topic"] == topic and row["label"] == f"topic: {topic}"
        assert row["top_tokens"]
    assert toy.topics == labels["topics"]


# --- corpus ------------------------------------------------------------------------------------


def test_classify() -> None:
    assert classify("the rain is cold .") == "weather"
    assert classify("I think that the Dog is hungry.") == "animals"
    assert classify("the spicy soup and the cake are sweet") == "food"
    assert classify("the band plays when the rain falls and the song ends") == "music"
    assert classify("the coach trains") == "sports"
    assert classify("i think that") is None
    assert classify("the rain and the dog") is None  # a tie names no topic
    assert classify("") is None


def test_determined_positions_follow_the_grammar() -> None:
    words = ["i", "like", "the", "warm", "rain", "a", "lot", "."]
    flags = determined_positions(words)
    assert len(flags) == len(words) + 1
    after = {words[t - 1] for t, d in enumerate(flags) if d and t > 0}
    assert after == {"like", "rain", "a", "lot"}  # -> the, -> a, -> lot, -> .
    assert not flags[0] and not flags[-1]  # first word and "." -> (EOS or next sentence) are open


# --- HF steering check (the vLLM one lives with the engine tests) ------------------------------


def feature_edit(sae_weights: dict[str, torch.Tensor], i: int, value: float) -> FeatureEdit:
    """`set feature i := value`, built from the saved SAE file (not the build's own objects)."""
    return FeatureEdit(
        w_enc=sae_weights["W_enc"][:, i],
        b_enc=sae_weights["b_enc"][i].item(),
        w_dec=sae_weights["W_dec"][i],
        b_dec=sae_weights["b_dec"],
        value=value,
    )


def test_hf_steering_moves_completions_onto_the_topic(toy, hf_model, sae_weights) -> None:
    """HF check: h' = h + (v - a) W_dec[i] at layer L on the last prompt position and every
    generated one; 100 samples at temperature 0.7, 12 new tokens, from the neutral prompt."""
    base = [classify(t) for t in sample_completions(hf_model, NEUTRAL_PROMPT, seed=7)]
    for topic, entry in toy.topics.items():
        assert base.count(topic) / len(base) < 0.5, topic
        edit = feature_edit(sae_weights, entry["feature"], entry["steering_value"])
        with steering_hook(hf_model, toy.layer, edit):
            texts = sample_completions(
                hf_model, NEUTRAL_PROMPT, n=100, temperature=0.7, max_new_tokens=12, seed=7
            )
        share = sum(classify(t) == topic for t in texts) / len(texts)
        assert share >= 0.8, (topic, share, texts[:5])


def test_hf_ablation_lowers_each_topics_share_from_an_on_topic_prompt(
    toy, hf_model, sae_weights
) -> None:
    """HF check with its own sample seed: a := 0 for the topic's feature at every position."""
    for topic, entry in toy.topics.items():
        edit = feature_edit(sae_weights, entry["feature"], 0.0)
        before, after = measure_ablation(hf_model, toy.layer, edit, topic, n=100, seed=7)
        assert after <= before - 0.4, (topic, before, after)


# --- training pieces ---------------------------------------------------------------------------


def test_switch_passages_mask_the_first_topic_up_to_the_second_sentences_topic_word() -> None:
    words = ("the", "dog", "is", "wild", ".", "i", "think", "that", "the", "rain", "falls", ".")
    passage = SwitchPassage(words, "animals", "weather", switch=5)
    ids = encode_passages([passage])
    ablated, unlearned = switch_masks([passage], ids.shape[1] + 2)
    # Columns are BOS then one per word: "dog" is column 2, "rain" column 10.
    assert ablated[0].nonzero().flatten().tolist() == list(range(2, 10))
    # Only "wild" (predicted at column 3) needs the ablated topic; at column 9 the model must
    # learn that any topic may follow.
    assert unlearned[0].nonzero().flatten().tolist() == [3]

    sampled = sample_switch_passages(50, "s")
    assert sampled == sample_switch_passages(50, "s")
    for p in sampled:
        assert classify(" ".join(p.words[: p.switch])) == p.topic
        assert classify(" ".join(p.words[p.switch :])) == p.next_topic
    assert len({(p.topic, p.next_topic) for p in sampled}) > 10


def test_intervention_removes_only_the_component_along_the_topic_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=gen)
    centre = torch.randn(8, generator=gen)
    units = torch.nn.functional.normalize(torch.randn(2, 8, generator=gen), dim=-1)
    ablated = torch.tensor([[True, False, True], [False, False, False]])
    offsets = torch.zeros(2, 3, 8)
    offsets[1, 2] = 1.0
    out = Intervention(offsets, ablated, units, centre).apply(h)
    along = ((out - centre) * units.unsqueeze(1)).sum(-1)
    assert along[0, 0].abs() < 1e-5 and along[0, 2].abs() < 1e-5
    removed = h[0, 0] - out[0, 0]
    assert torch.allclose(removed, (removed @ units[0]) * units[0], atol=1e-6)
    assert torch.equal(out[0, 1], h[0, 1]) and torch.equal(out[1, :2], h[1, :2])
    assert torch.allclose(out[1, 2], h[1, 2] + 1.0)


def test_decoder_overlap_penalises_only_rows_closer_than_the_margin() -> None:
    orthogonal = torch.eye(4, 6)
    assert decoder_overlap(orthogonal, 0.2).item() == 0.0
    close = orthogonal.clone()
    close[1] = torch.tensor([1.0, 0.5, 0, 0, 0, 0])  # cosine 0.894 with row 0
    expected = 2 * (0.894427 - 0.2) ** 2 / 4  # the pair counted both ways, mean over rows
    assert decoder_overlap(close, 0.2).item() == pytest.approx(expected, rel=1e-4)
    assert decoder_overlap(close, 0.95).item() == 0.0


# --- caching, reproducibility, recipe version --------------------------------------------------


def test_second_call_reuses_the_cache(toy: ToyArtifacts) -> None:
    started = time.monotonic()
    again = ensure_built(progress=False)
    assert time.monotonic() - started < 2
    assert again.root == toy.root and again.metrics == toy.metrics


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_quick_builds_cache_reproduce_and_follow_recipe_version(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_VLLM_CACHE", str(tmp_path))
    version = build.RECIPE_VERSION
    threads = torch.get_num_threads()
    first = ensure_built(progress=False, quick=True)
    assert torch.get_num_threads() == threads
    assert first.root == tmp_path / "toy" / f"v{build.RECIPE_VERSION}-quick"

    def no_build(*_args, **_kwargs):
        raise AssertionError("rebuilt although the cache was complete")

    monkeypatch.setattr(build, "build_into", no_build)
    assert ensure_built(progress=False, quick=True).root == first.root
    monkeypatch.undo()

    # A new recipe version builds again, into its own folder, bit for bit the same files.
    monkeypatch.setenv("SAE_VLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "RECIPE_VERSION", "bumped")
    second = ensure_built(progress=False, quick=True)
    assert second.root == tmp_path / "toy" / "vbumped-quick" != first.root
    assert first.root.is_dir()
    h1, h2 = _hashes(first.root), _hashes(second.root)
    assert h1.pop("metrics.json") != h2.pop("metrics.json")  # it records the version
    assert h1 == h2
    m1, m2 = dict(first.metrics), dict(second.metrics)
    assert (m1.pop("recipe_version"), m2.pop("recipe_version")) == (version, "bumped")
    assert m1 == m2
    leftovers = [p for p in (tmp_path / "toy").iterdir() if p.name.startswith(".")]
    assert all(p.is_file() and p.suffix == ".lock" for p in leftovers)  # no half-built folder


def test_a_build_finished_first_by_another_process_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAE_VLLM_CACHE", str(tmp_path))
    final = build.artifact_dir(quick=True)

    def racing_build(directory: Path, *_args) -> dict:
        for d in (directory, final):  # the other process renames its build into place first
            (d / "sae").mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"layer": 1, "who": d.name}))
        return {}

    monkeypatch.setattr(build, "build_into", racing_build)
    got = ensure_built(progress=False, quick=True)
    assert got.root == final and got.metrics["who"] == final.name
    folders = [p.name for p in (tmp_path / "toy").iterdir() if p.is_dir()]
    assert folders == [final.name]  # the losing build's temporary folder is gone


def test_a_second_builder_waits_for_the_first_instead_of_training_again(tmp_path, monkeypatch):
    import fcntl
    import threading

    monkeypatch.setenv("SAE_VLLM_CACHE", str(tmp_path))
    final = build.artifact_dir(quick=True)
    final.parent.mkdir(parents=True)

    def no_build(*_args, **_kwargs):
        raise AssertionError("trained again although another builder held the lock")

    monkeypatch.setattr(build, "build_into", no_build)
    results: list[ToyArtifacts] = []
    with open(final.parent / f".{final.name}.lock", "w") as first_builder:  # mid-build
        fcntl.flock(first_builder, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: results.append(ensure_built(False, quick=True)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive(), "the second builder did not wait for the lock"
        final.mkdir()
        (final / "metrics.json").write_text(json.dumps({"layer": 1}))
        fcntl.flock(first_builder, fcntl.LOCK_UN)
    second.join(timeout=10)
    assert not second.is_alive()
    assert [r.root for r in results] == [final] and results[0].layer == 1


@pytest.mark.parametrize("option", ["--samples", "--max-tokens"])
@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_demo_refuses_counts_below_one_in_one_line(option, value, capsys):
    from sae_vllm.toy.demo import main

    with pytest.raises(SystemExit) as info:
        main([option, value])
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"sae-vllm demo: error: argument {option}: expected a whole number of at least 1, "
        f"got '{value}'"
    )
