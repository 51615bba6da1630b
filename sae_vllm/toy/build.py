"""Building the embedded default (toy model, SAE, labels) deterministically and caching it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_vllm.toy.calibration import (
    Calibrated,
    CalibrationRecipe,
    ablation_shares,
    baseline,
    choose,
)
from sae_vllm.toy.corpus import sample_passages, sample_switch_passages
from sae_vllm.toy.grammar import TOPIC_NAMES
from sae_vllm.toy.labels import feature_table, labels_document, topic_candidates
from sae_vllm.toy.model_training import ModelRecipe, determined_accuracy, make_model, train_model
from sae_vllm.toy.progress import Progress
from sae_vllm.toy.residual import hook_name
from sae_vllm.toy.sae_files import save_sae
from sae_vllm.toy.sae_training import SAERecipe, collect_activations, sae_metrics, train_sae
from sae_vllm.toy.steering_check import on_topic_prompt
from sae_vllm.toy.tokenizer import save_tokenizer

# Bump whenever anything that changes the built files changes: caches keyed by it rebuild.
RECIPE_VERSION = "7"
SAE_ID = "toy"


@dataclass(frozen=True)
class Recipe:
    """Everything the build depends on besides code: sizes, steps, seeds, the SAE's layer."""

    layer: int = 1  # SAE site: output of decoder layer 1 of 4 (blocks.1.hook_resid_post)
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    sae: SAERecipe = field(default_factory=SAERecipe)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    sae_passages: int = 3000
    heldout_passages: int = 1500


FULL = Recipe()
# Same code path at toy sizes, for tests of caching and reproducibility; quality is not checked.
QUICK = Recipe(
    model=ModelRecipe(steps=15, batch=16, inject_from_step=5),
    sae=SAERecipe(d_sae=64, steps=40, batch=256),
    calibration=CalibrationRecipe(multipliers=(1.0, 4.0), samples=8),
    sae_passages=200,
    heldout_passages=200,
)


@dataclass
class ToyArtifacts:
    """Where a built toy lives and what the build measured."""

    root: Path
    model_dir: Path
    sae_dir: Path
    labels_path: Path
    layer: int
    sae_id: str = SAE_ID
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def topics(self) -> dict[str, dict[str, Any]]:
        """Per topic: its feature index, AUROC, typical max and recommended steering value."""
        return json.loads(self.labels_path.read_text())["topics"]


def cache_root() -> Path:
    """$SAE_VLLM_CACHE, else $XDG_CACHE_HOME/sae-vllm, else ~/.cache/sae-vllm."""
    if os.environ.get("SAE_VLLM_CACHE"):
        return Path(os.environ["SAE_VLLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sae-vllm"


def artifact_dir(quick: bool = False) -> Path:
    """The cache folder for the current RECIPE_VERSION (quick builds live beside it)."""
    return cache_root() / "toy" / (f"v{RECIPE_VERSION}" + ("-quick" if quick else ""))


def load_artifacts(root: Path) -> ToyArtifacts:
    """The ToyArtifacts of a finished build folder."""
    metrics = json.loads((root / "metrics.json").read_text())
    return ToyArtifacts(
        root=root,
        model_dir=root / "model",
        sae_dir=root / "sae",
        labels_path=root / "sae" / "labels.json",
        layer=metrics["layer"],
        metrics=metrics,
    )


def ensure_built(progress: bool = True, quick: bool = False) -> ToyArtifacts:
    """The cached toy model and SAE, built first if this RECIPE_VERSION has none yet.

    One process builds at a time (a lock file beside the cache folder): a second caller waits
    for the first one's build instead of training the same toy again. The build goes into a
    private temporary folder that is renamed into place at the end, so a reader never sees half
    a build; if another process finished first anyway (a filesystem without locks), its build
    is kept.
    """
    final = artifact_dir(quick)
    if (final / "metrics.json").is_file():
        return load_artifacts(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(final, Progress(progress)):
        if not (final / "metrics.json").is_file():
            _build_into_place(final, quick, progress)
    return load_artifacts(final)


@contextmanager
def _build_lock(final: Path, say: Progress):
    """Holds an exclusive lock on `final`'s lock file, saying so when it has to wait; closing
    the file releases it."""
    with open(final.parent / f".{final.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say.say(f"waiting for another process that is building {final}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_into_place(final: Path, quick: bool, progress: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished build is an ordinary folder
    try:
        build_into(tmp, QUICK if quick else FULL, progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "metrics.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _deterministic_torch(seed: int):
    """One thread, deterministic kernels and a seeded global RNG; the caller's state comes back."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def build_into(directory: Path, recipe: Recipe = FULL, progress: bool = True) -> dict[str, Any]:
    """Train and measure everything, writing model/, sae/ (with labels.json) and metrics.json."""
    say = Progress(progress)
    started = time.monotonic()
    with _deterministic_torch(recipe.seed), torch.inference_mode(False), torch.enable_grad():
        say.say(f"building the toy model and SAE into {directory}")
        lm_data = sample_passages(recipe.model.steps * recipe.model.batch, f"{recipe.seed}-lm")
        heldout = sample_passages(recipe.heldout_passages, f"{recipe.seed}-heldout")
        switches = sample_switch_passages(
            recipe.model.steps * recipe.model.switch_rows, f"{recipe.seed}-switch"
        )
        model = make_model(recipe.model)
        train_model(model, lm_data, switches, recipe.model, recipe.layer, say)
        metrics: dict[str, Any] = {
            "recipe_version": RECIPE_VERSION,
            "layer": recipe.layer,
            "hook_name": hook_name(recipe.layer),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        metrics |= determined_accuracy(model, heldout)

        say.say("collecting residual-stream activations")
        sae_data = sample_passages(recipe.sae_passages, f"{recipe.seed}-sae")
        train_x = collect_activations(model, sae_data, recipe.layer)
        held = collect_activations(model, heldout, recipe.layer)
        sae = train_sae(train_x.x, recipe.sae, say)
        metrics |= {"d_sae": recipe.sae.d_sae} | sae_metrics(sae, held.x)

        with torch.no_grad():
            acts = sae.encode(held.x)
        say.say("choosing topic features and steering values")
        topics: dict[str, dict[str, Any]] = {}
        for topic in TOPIC_NAMES:
            taken = {t["feature"] for t in topics.values()}
            candidates = topic_candidates(
                acts, held, heldout, topic, taken, recipe.calibration.candidates
            )
            chosen = choose(model, sae, recipe.layer, candidates, recipe.calibration, say)
            ablation = ablation_shares(model, sae, recipe.layer, chosen.feature, recipe.calibration)
            topics[topic] = _topic_entry(chosen, ablation)
        metrics["topics"] = topics
        metrics["baseline_share"] = baseline(model, recipe.calibration.samples)

        say.say("writing files")
        _save_model(model, directory / "model", progress)
        context = max(len(p.words) for p in sae_data) + 2
        save_sae(sae, directory / "sae", recipe.layer, context)
        labels = labels_document(
            feature_table(acts, held.token_ids), topics, recipe.layer, hook_name(recipe.layer)
        )
        _write_json(directory / "sae" / "labels.json", labels)
        _write_json(directory / "metrics.json", metrics)
    say.say(f"built in {time.monotonic() - started:.0f} s\n{format_metrics(metrics)}")
    return metrics


def _topic_entry(chosen: Calibrated, ablation: tuple[float, float]) -> dict[str, Any]:
    tf = chosen.feature
    return {
        "ablation_share_before": ablation[0],
        "ablation_share_after": ablation[1],
        "feature": tf.feature,
        "auroc": round(tf.auroc, 6),
        "token_auroc": round(tf.token_auroc, 6),
        "typical_max": round(tf.typical_max, 6),
        "steering_multiple": chosen.multiple,
        "steering_value": round(chosen.multiple * tf.typical_max, 6),
        "steered_share": chosen.result.topic_share,
        "steered_grammatical_share": chosen.result.grammatical_share,
    }


def _save_model(model, directory: Path, progress: bool) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer files."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers 5 writes "dtype"; older readers (and vLLM's docs) look for "torch_dtype".
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = config["dtype"]
    _write_json(config_path, config)
    save_tokenizer(directory)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few human-readable lines of the build's quality numbers."""
    lines = [
        f"model: next-token accuracy on grammar-determined positions "
        f"{metrics['determined_accuracy']:.4f} ({metrics['determined_positions']} positions), "
        f"held-out loss {metrics['heldout_loss']:.3f}",
        f"SAE (layer {metrics['layer']}, d_sae {metrics['d_sae']}): explained variance "
        f"{metrics['explained_variance']:.4f}, L0 {metrics['l0']:.2f}, "
        f"dead {metrics['dead_fraction']:.3f}",
        "unsteered shares from 'i think that': "
        + ", ".join(f"{t} {metrics['baseline_share'][t]:.2f}" for t in TOPIC_NAMES),
    ]
    for t, m in metrics["topics"].items():
        lines.append(
            f"  {t:8s} feature {m['feature']:4d}  AUROC {m['auroc']:.3f} "
            f"(token {m['token_auroc']:.3f})  typical max {m['typical_max']:.2f}  "
            f"set {m['steering_value']:.2f} ({m['steering_multiple']:g}x) -> "
            f"share {m['steered_share']:.2f} "
            f"(grammatical {m['steered_grammatical_share']:.2f}); ablate from "
            f"{on_topic_prompt(t)!r}: share {m['ablation_share_before']:.2f} -> "
            f"{m['ablation_share_after']:.2f}"
        )
    return "\n".join(lines)
