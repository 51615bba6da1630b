"""`sae-vllm serve` refuses a bad setup before the engine starts: exit 1, one line on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.server


def sae_vllm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_vllm.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def write_narrow_sae(directory: Path, d_in: int = 64, d_sae: int = 32) -> Path:
    """A SAELens SAE whose d_in does not match the tiny model."""
    directory.mkdir(parents=True)
    W_dec = torch.randn(d_sae, d_in)
    tensors = {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": W_dec,
               "b_dec": torch.zeros(d_in)}  # fmt: skip
    save_file(tensors, directory / "sae_weights.safetensors")
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"hook_name": "blocks.1.hook_resid_post"}}  # fmt: skip
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    from tiny_model import build_tiny_llama, write_random_sae

    root = tmp_path_factory.mktemp("startup")
    sae = root / "sae"
    write_random_sae(sae, "relu", layer=1, d_sae=64)
    bad_labels = root / "bad-labels.json"
    bad_labels.write_text("{")
    nan = root / "nan"
    write_random_sae(nan, "relu", layer=1, d_sae=64)
    weights = load_file(nan / "sae_weights.safetensors")
    weights["W_enc"][3, 40] = float("nan")
    save_file(weights, nan / "sae_weights.safetensors")
    return {
        "nan": nan,
        "root": root,
        "model": build_tiny_llama(root / "model"),
        "sae": sae,
        "narrow": write_narrow_sae(root / "narrow"),
        "bad_labels": bad_labels,
    }


# A --steering-variant value, its braces doubled for CASES' str.format
VARIANT = '{name}={{{{"edits": [{{{{"feature": {feature}, "op": "ablate"}}}}]}}}}'
CASES = [  # (id, args after the model, expected end of the error line)
    ("missing-sae", ["--sae", "x={root}/missing"], "SAE 'x': {root}/missing does not exist"),
    ("d_in-mismatch", ["--sae", "n={narrow}"],
     "SAE 'n': d_in 64 does not match the model's hidden size 128"),
    ("nan-weight", ["--sae", "z={nan}"],  # the worker found it after loading the model
     "SAE 'z': {nan}: W_enc at [3, 40] (as the file stores it) is NaN or infinite"),
    ("bad-layer", ["--sae", "s={sae}@9"],
     "SAE 's': layer 9 does not exist (the model has layers 0..3)"),
    ("labels-unknown-id", ["--sae", "s={sae}", "--sae-labels", "t={bad_labels}"],
     "--sae-labels names SAE 't', which is not configured"),
    ("labels-bad-json", ["--sae", "s={sae}", "--sae-labels", "s={bad_labels}"],
     "SAE 's': labels {bad_labels}: not valid JSON"),
    ("duplicate-id", ["--sae", "s={sae}", "--sae", "s={sae}"], "duplicate SAE ids: s"),
    ("bad-max-edits", ["--sae", "s={sae}", "--max-edits", "0"], "max_edits"),
    ("user-config-clash", ["--sae", "s={sae}", "--additional-config",
                           '{{"sae_steering": {{"saes": [{{"id": "s", "path": "{sae}"}}]}}}}'],
     "duplicate SAE ids: s"),
    ("variant-feature-out-of-range",
     ["--sae", "s={sae}", "--steering-variant", VARIANT.format(name="v", feature=64)],
     "steering variant 'v': edits[0].feature: 64 is out of range for SAE 's' (d_sae 64)"),
    ("variant-value-past-floats",
     ["--sae", "s={sae}", "--steering-variant",
      'v={{"edits": [{{"feature": 1, "op": "add", "value": 1' + "0" * 400 + "}}]}}"],
     "edits.0.value: magnitude must fit a float"),
    ("variant-named-like-the-model",
     ["--sae", "s={sae}", "--served-model-name", "m", "--steering-variant",
      VARIANT.format(name="m", feature=1)],
     "steering variant 'm': the name of a served model or LoRA adapter"),
    ("variant-twice", ["--sae", "s={sae}",
                       "--steering-variant", VARIANT.format(name="v", feature=1),
                       "--steering-variant", VARIANT.format(name="v", feature=2)],
     "steering variant 'v' is given twice"),
]  # fmt: skip


@pytest.fixture
def serve_in_process(monkeypatch, capsys):
    """`sae-vllm serve ARGS` in this process (one vLLM import for every case): (rc, stderr)."""
    import os

    from sae_vllm.server.launch import serve

    # the serve parser sets vLLM's worker start method, as `vllm serve` does; keep ours
    method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    if method is None:
        monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    else:
        monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", method)

    def run(*args: str) -> tuple[int, str]:
        code = serve(list(args))
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_setup_is_refused_with_one_line(paths, serve_in_process, args, expected):
    fill = {name: str(path) for name, path in paths.items()}
    code, stderr = serve_in_process(str(paths["model"]), *[a.format(**fill) for a in args])
    assert code == 1
    assert stderr.count("sae-vllm serve: error") == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sae-vllm serve: error: ")
    assert expected.format(**fill) in last


def test_missing_model_is_refused_with_one_line(paths, serve_in_process):
    code, stderr = serve_in_process(str(paths["root"] / "no-model"), "--sae", f"s={paths['sae']}")
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"sae-vllm serve: error: model {paths['root'] / 'no-model'}")


@pytest.mark.parametrize("case", ["missing-sae", "d_in-mismatch"])
def test_the_command_exits_1_without_a_traceback(paths, case):
    _, args, expected = next(c for c in CASES if c[0] == case)
    fill = {name: str(path) for name, path in paths.items()}
    result = sae_vllm("serve", str(paths["model"]), *[a.format(**fill) for a in args])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"sae-vllm serve: error: {expected.format(**fill)}"


def test_frontends_that_cannot_carry_steering_are_refused(paths, serve_in_process, monkeypatch):
    model, sae = str(paths["model"]), f"s={paths['sae']}"
    code, stderr = serve_in_process(model, "--sae", sae, "--grpc")
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        "sae-vllm serve: error: --grpc is not supported by sae-vllm serve "
        "(its requests cannot steer)"
    )
    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    code, stderr = serve_in_process(model, "--sae", sae)
    assert code == 1
    assert "VLLM_USE_RUST_FRONTEND is not supported" in stderr.strip().splitlines()[-1]


def test_malformed_sae_option_is_a_usage_error(paths, serve_in_process, capsys):
    with pytest.raises(SystemExit) as info:
        serve_in_process(str(paths["model"]), "--sae", "no-equals-sign")
    assert info.value.code == 2
    assert "argument --sae: expected ID=PATH[@LAYER]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # it was read as part of the path, "does not exist"
        serve_in_process(str(paths["model"]), "--sae", f"s={paths['sae']}@-1")
    assert info.value.code == 2
    assert "the layer after '@' must be a non-negative integer, got '-1'" in capsys.readouterr().err


def test_malformed_variant_option_is_a_usage_error(paths, serve_in_process, capsys):
    with pytest.raises(SystemExit) as info:
        serve_in_process(str(paths["model"]), "--steering-variant", "v={not json")
    assert info.value.code == 2
    assert "argument --steering-variant: variant 'v': JSON is not valid JSON" in (
        capsys.readouterr().err
    )


def help_text(serve_in_process, capsys, option: str) -> str:
    with pytest.raises(SystemExit) as info:
        serve_in_process(option)
    assert info.value.code == 0
    return capsys.readouterr().out


STEERING_HELP = {  # each steering option, and a phrase of its description
    "--sae ID=PATH[@LAYER]": "An SAE requests may steer with",
    "--sae-labels ID=PATH": "A feature-labels JSON",
    "--steering-variant NAME=SPEC": "A served model name that steers every request",
    "--max-edits": "Most feature edits one request may make",
}


def test_help_lists_steering_and_vllm_options(serve_in_process, capsys):
    usage = help_text(serve_in_process, capsys, "--help")
    for option in (*STEERING_HELP, "--api-key"):
        assert option.split()[0] in usage
    # vLLM's --help lists option groups; ours says where its options are described
    assert "SAESteering" in usage and "--help=SAESteering" in usage
    described = help_text(serve_in_process, capsys, "--help=SAESteering")
    for option, phrase in STEERING_HELP.items():
        assert option in described and phrase in " ".join(described.split())
    # each option's help says its default; argparse's "(default: None)" would contradict it
    assert "(default: " not in described


def test_cli_usage_and_unknown_command():
    assert sae_vllm().returncode == 2
    result = sae_vllm("frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
    assert sae_vllm("--help").returncode == 0


def test_a_repeated_steering_option_gets_no_duplicate_warning(paths, serve_in_process):
    """vLLM's parser warned "Found duplicate keys --sae" of every documented `--sae A --sae B`;
    another option given twice still warns."""
    import logging

    warnings: list[str] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    def serve_recording(*args: str) -> None:
        # vLLM's, which propagates nowhere; each start resets vLLM's logging, so set it each time
        parser_logger = logging.getLogger("vllm.utils.argparse_utils")
        recording = Recording(logging.WARNING)
        parser_logger.addHandler(recording)
        level = parser_logger.level
        parser_logger.setLevel(logging.WARNING)  # the tests' vLLM logs errors only
        try:
            serve_in_process(*args)
        finally:
            parser_logger.removeHandler(recording)
            parser_logger.setLevel(level)

    model, sae, narrow = str(paths["model"]), f"s={paths['sae']}", f"t={paths['narrow']}"
    serve_recording(model, "--sae", sae, "--sae", narrow)
    assert warnings == []
    serve_recording(model, "--sae", sae, "--sae", narrow, "--seed", "1", "--seed", "2")
    assert warnings in (
        ["Found duplicate keys --seed, --sae"],
        ["Found duplicate keys --sae, --seed"],
    )
