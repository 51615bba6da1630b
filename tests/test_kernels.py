"""Steering kernels on CPU: Triton (interpreter) and torch reference against a float64 oracle.

The oracle is independent of kernels/: it takes the SAE's raw tensors (b_dec subtracted from
the input, nothing folded) and computes the error-term form D(a') + (h - D(a)) per token in
numpy. Weights and activations are drawn on a coarse binary grid, so every dot product is exact
in float32 and the only error left is the final rounding of hidden to its dtype: tolerances are
about one unit in the last place of that dtype."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import sae_vllm.kernels as kpkg
except ImportError:  # a bare checkout on PYTHONPATH (the GPU box)
    import kernels as kpkg

OP_CODES = kpkg.OP_CODES
SteeringWeights = kpkg.SteeringWeights
apply_edit = kpkg.apply_edit
prepare_weights = kpkg.prepare_weights
prepare_weights_by_block = kpkg.prepare_weights_by_block
steer_reference_ = kpkg.steer_reference_
reference_module = importlib.import_module(f"{kpkg.__name__}.reference")
cpu_decode_module = importlib.import_module(f"{kpkg.__name__}.cpu_decode")
weights_module = importlib.import_module(f"{kpkg.__name__}.weights")

ARCHS = ("relu", "jumprelu", "topk")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One unit in the last place, relative; atol covers results that round to (near) zero.
RTOL = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _load_interpreted() -> ModuleType:
    """A private copy of kernels/triton_steer.py whose kernels run in Triton's interpreter,
    whatever another module of this process imported."""
    path = Path(kpkg.__file__).with_name("triton_steer.py")
    spec = importlib.util.spec_from_file_location(f"{kpkg.__name__}._triton_interpreted", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def interp() -> Iterator[ModuleType]:
    # Triton reads the mode when it is imported: imported earlier, every kernel here fails with
    # "Cannot call @triton.jit'd outside of the scope of a kernel".
    assert "triton" not in sys.modules, (
        "Triton was imported before these tests set its interpreter mode: a test module imports "
        "vLLM or Triton while pytest collects; import it inside its tests"
    )
    # Set only while these tests run, so it never leaks into engine processes started later.
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield _load_interpreted()
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


# ---------------------------------------------------------------------------------------------
# Cases and the float64 oracle


@dataclass
class Case:
    """One call of the op: the raw SAE (float64 numpy), its prepared weights, and the inputs."""

    arch: str
    raw: dict[str, np.ndarray | int | bool | None]
    weights: SteeringWeights
    hidden_buf: torch.Tensor  # [T + pad, d_in]; hidden is its first T rows
    residual: torch.Tensor | None
    row_feat: torch.Tensor
    row_val: torch.Tensor
    row_op: torch.Tensor
    tok_row: torch.Tensor  # [T + pad]
    tok_scope: torch.Tensor  # [T + pad]
    n_tok: int

    @property
    def hidden(self) -> torch.Tensor:
        return self.hidden_buf[: self.n_tok]

    def op_args(self, hidden: torch.Tensor) -> tuple:
        w = self.weights
        return (
            hidden, self.residual, w.enc_t, w.b_enc, w.threshold, w.W_dec,
            self.row_feat, self.row_val, self.row_op, self.tok_row, self.tok_scope, w.k,
        )  # fmt: skip

    def steered(self) -> np.ndarray:
        rows = self.tok_row[: self.n_tok].numpy()
        ok = (rows >= 0) & (rows < self.row_feat.shape[0])
        return ok & self.tok_scope[: self.n_tok].numpy()


def _grid(rng: np.random.Generator, shape, scale: float, step: float) -> np.ndarray:
    """Normal draws rounded to multiples of `step`, at most 255 steps: exact in every dtype."""
    return np.clip(np.round(rng.normal(0.0, scale, shape) / step), -255, 255) * step


def make_case(
    seed: int,
    arch: str = "relu",
    dtype: torch.dtype = torch.float32,
    d_in: int = 80,
    d_sae: int = 128,
    n_tok: int = 12,
    n_rows: int = 5,
    n_slots: int = 6,
    residual: bool = True,
    apply_b_dec: bool = True,
    pad: int = 3,
    k: int | None = None,
    empty_share: float = 0.25,
) -> Case:
    rng = np.random.default_rng(seed)
    raw: dict[str, np.ndarray | int | bool | None] = {
        "W_enc": _grid(rng, (d_in, d_sae), 0.25, 2.0**-6),
        "b_enc": _grid(rng, (d_sae,), 0.5, 2.0**-6),
        "W_dec": _grid(rng, (d_sae, d_in), 0.25, 2.0**-6),
        "b_dec": _grid(rng, (d_in,), 0.5, 2.0**-6),
        "threshold": None,
        "k": None,
        "apply_b_dec": apply_b_dec,
    }
    if arch == "jumprelu":
        raw["threshold"] = _grid(rng, (d_sae,), 1.0, 2.0**-4)  # some negative: θ acts as max(θ, 0)
    if arch == "topk":
        raw["k"] = k if k is not None else max(1, d_sae // 4)
    weights = prepare_weights(
        *(torch.from_numpy(raw[name]) for name in ("W_enc", "b_enc", "W_dec", "b_dec")),
        None if raw["threshold"] is None else torch.from_numpy(raw["threshold"]),
        raw["k"],
        apply_b_dec,
        dtype=dtype,
        device="cpu",
    )
    total = n_tok + pad
    hidden_buf = torch.from_numpy(_grid(rng, (total, d_in), 1.0, 2.0**-3)).to(dtype)
    res = torch.from_numpy(_grid(rng, (n_tok, d_in), 1.0, 2.0**-3)).to(dtype) if residual else None

    feats = np.stack([rng.choice(d_sae, n_slots, replace=False) for _ in range(n_rows)])
    feats[rng.random((n_rows, n_slots)) < empty_share] = -1
    ops = rng.integers(0, len(OP_CODES), (n_rows, n_slots))
    vals = _grid(rng, (n_rows, n_slots), 4.0, 2.0**-3)
    # Token rows: -1, valid rows (every row used), one past the table, and in/out of scope.
    choices = np.concatenate([[-1, n_rows + 2], np.arange(n_rows)])
    tok_row = rng.choice(choices, total)
    tok_row[: min(n_rows, n_tok)] = np.arange(min(n_rows, n_tok))
    tok_row[n_tok:] = rng.integers(0, n_rows, pad)  # padded tail: valid rows, must not be read
    tok_scope = rng.random(total) < 0.8
    tok_scope[:n_rows] = True
    tok_scope[n_tok:] = True
    return Case(
        arch=arch,
        raw=raw,
        weights=weights,
        hidden_buf=hidden_buf,
        residual=res,
        row_feat=torch.from_numpy(feats).to(torch.int32),
        row_val=torch.from_numpy(vals).to(torch.float32),
        row_op=torch.from_numpy(ops).to(torch.int32),
        tok_row=torch.from_numpy(tok_row).to(torch.int32),
        tok_scope=torch.from_numpy(tok_scope),
        n_tok=n_tok,
    )


def _edit_np(a: float, op: int, v: float) -> float:
    table = {
        0: lambda: v,
        1: lambda: a + v,
        2: lambda: a * v,
        3: lambda: 0.0,
        4: lambda: max(a, v),
        5: lambda: min(a, v),
    }
    return table[op]() if op in table else a


def oracle_activations(case: Case, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pre, a) over all d_sae features of one token's residual stream x, from the raw SAE."""
    raw = case.raw
    x_in = x - raw["b_dec"] if raw["apply_b_dec"] else x
    pre = x_in @ raw["W_enc"] + raw["b_enc"]
    if case.arch == "relu":
        return pre, np.maximum(pre, 0.0)
    if case.arch == "jumprelu":
        return pre, np.maximum(pre, 0.0) * (pre > raw["threshold"])
    kth = np.sort(pre)[-min(int(raw["k"]), pre.size)]
    return pre, np.where(pre >= kth, np.maximum(pre, 0.0), 0.0)


def oracle(case: Case) -> np.ndarray:
    """Expected hidden [T, d_in] in float64: D(a') + (x - D(a)) - residual for steered tokens."""
    raw = case.raw
    hidden = case.hidden.double().numpy()
    res = case.residual.double().numpy() if case.residual is not None else np.zeros_like(hidden)
    feats, vals, ops = (t.numpy() for t in (case.row_feat, case.row_val, case.row_op))
    d_sae = raw["W_dec"].shape[0]
    out = hidden.copy()
    for t in np.flatnonzero(case.steered()):
        r = case.tok_row[t].item()
        x = hidden[t] + res[t]
        _, a = oracle_activations(case, x)
        edited = a.copy()
        for i, op, v in zip(feats[r], ops[r], vals[r], strict=True):
            if 0 <= i < d_sae:
                edited[i] = _edit_np(a[i], int(op), float(v))

        def decode(acts: np.ndarray) -> np.ndarray:
            return acts @ raw["W_dec"] + raw["b_dec"]

        out[t] = decode(edited) + (x - decode(a)) - res[t]
    return out


def assert_matches_oracle(case: Case, got: torch.Tensor, expected: np.ndarray) -> None:
    dtype = got.dtype
    exp = torch.from_numpy(expected)
    err = (got.double() - exp).abs()
    tol = RTOL[dtype] * exp.abs() + ATOL[dtype]
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} values off; worst {err.max().item():.3g} "
        f"at {np.unravel_index(int(err.argmax()), err.shape)}"
    )
    unsteered = torch.from_numpy(~case.steered())
    assert _bits(got[unsteered]).equal(_bits(case.hidden[unsteered]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


Runner = Callable[[Case, torch.Tensor], None]


def run_reference(case: Case, hidden: torch.Tensor) -> None:
    steer_reference_(*case.op_args(hidden))


def triton_runner(interp: ModuleType, **launch: int) -> Runner:
    def run(case: Case, hidden: torch.Tensor) -> None:
        interp.steer_triton_(*case.op_args(hidden), **launch)

    return run


def run_case(case: Case, runner: Runner) -> torch.Tensor:
    """Run on a copy of the buffer; check the padded tail was left alone; return hidden."""
    buf = case.hidden_buf.clone()
    runner(case, buf[: case.n_tok])
    assert _bits(buf[case.n_tok :]).equal(_bits(case.hidden_buf[case.n_tok :]))
    return buf[: case.n_tok]


def run_cpu(case: Case, hidden: torch.Tensor) -> None:
    kpkg.steer_cpu_(*case.op_args(hidden))


def run_cpu_numpy(case: Case, hidden: torch.Tensor) -> None:
    """The CPU op with its compiled (numba) float32 loop switched off: the numpy path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_decode_module, "compiled_path_applies", lambda *tensors: False)
        kpkg.steer_cpu_(*case.op_args(hidden))


@pytest.fixture(params=["reference", "cpu", "cpu-numpy", "triton"])
def runner(request, interp) -> Runner:
    runners = {"reference": run_reference, "cpu": run_cpu, "cpu-numpy": run_cpu_numpy}
    return runners.get(request.param) or triton_runner(interp)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_cpu_path_dtype_conversions_round_exactly_as_torch():
    """The numpy path converts half types with bit tricks; they must equal torch's casts,
    including ties (round to nearest even), overflow to inf (silently, as torch's), infinities
    and subnormals; NaN stays NaN (torch's own NaN bits differ between its scalar and vector
    casts)."""
    cpu_decode = importlib.import_module(f"{kpkg.__name__}.cpu_decode")
    inf, nan = float("inf"), float("nan")
    special = [0.0, -0.0, 1.0, -1.5, inf, -inf, nan, -nan, 3.4e38, -3.4e38, 65520.0, 1e-40,
               -1e-45, 1.00390625, 1.01171875, 1.0048828125]  # fmt: skip
    values = np.concatenate(
        [np.array(special, dtype=np.float32), np.random.default_rng(0).standard_normal(4096)]
    ).astype(np.float32)
    index = np.arange(values.size)
    for dtype in (torch.bfloat16, torch.float16):
        got = torch.zeros(values.size, dtype=dtype)
        cpu_decode._scatter(got, index, values)
        want = torch.from_numpy(values).to(dtype)
        nan = want.isnan()
        assert got.isnan().equal(nan), dtype
        assert _bits(got[~nan]).equal(_bits(want[~nan])), dtype
        back = cpu_decode._gather_f32(want, index)
        assert np.array_equal(back, want.float().numpy(), equal_nan=True), dtype


def test_compiled_path_bfloat16_conversions_round_exactly_as_torch():
    """The compiled (numba) loop's bfloat16 load and store: exact widening, and rounding to
    nearest even with ties, overflow, infinities and subnormals as torch casts; NaN stays NaN."""
    loop = importlib.import_module(f"{kpkg.__name__}.cpu_loop")
    inf, nan = float("inf"), float("nan")
    special = [0.0, -0.0, 1.0, -1.5, inf, -inf, nan, -nan, 3.4e38, -3.4e38, 1e-40, -1e-45,
               1.00390625, 1.01171875, 1.0048828125, 1.0117188]  # fmt: skip
    values = np.concatenate(
        [np.array(special, dtype=np.float32), np.random.default_rng(1).standard_normal(4096)]
    ).astype(np.float32)
    stored = np.zeros((1, values.size), dtype=np.uint16)
    loop.store_row(stored, 0, True, values)
    got = torch.from_numpy(stored[0].view(np.int16)).view(torch.bfloat16)
    want = torch.from_numpy(values).to(torch.bfloat16)
    nan_mask = want.isnan()
    assert got.isnan().equal(nan_mask)
    assert _bits(got[~nan_mask]).equal(_bits(want[~nan_mask]))
    bits = np.empty(values.size, dtype=np.uint32)
    loop.load_row(stored, 0, True, bits, bits.view(np.float32))
    assert np.array_equal(bits.view(np.float32), got.float().numpy(), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Edit ops and weight preparation


def test_op_codes_are_the_documented_numbers():
    assert OP_CODES == {"set": 0, "add": 1, "scale": 2, "ablate": 3, "floor": 4, "cap": 5}


def test_apply_edit_each_op():
    a = torch.tensor([1.5, -2.0, 0.0, 3.0])
    v = torch.tensor([2.0, 2.0, -1.0, 0.5])
    expected = {
        "set": [2.0, 2.0, -1.0, 0.5],
        "add": [3.5, 0.0, -1.0, 3.5],
        "scale": [3.0, -4.0, -0.0, 1.5],
        "ablate": [0.0, 0.0, 0.0, 0.0],
        "floor": [2.0, 2.0, 0.0, 3.0],
        "cap": [1.5, -2.0, -1.0, 0.5],
    }
    for name, want in expected.items():
        op = torch.full_like(a, OP_CODES[name], dtype=torch.int32)
        assert apply_edit(a, op, v).tolist() == want, name
    mixed = torch.tensor([0, 1, 2, 99], dtype=torch.int32)
    assert apply_edit(a, mixed, v).tolist() == [2.0, 0.0, -0.0, 3.0]  # unknown code: a as is


def test_prepare_weights_folds_b_dec_and_lays_out_feature_major(monkeypatch):
    monkeypatch.setattr(weights_module, "_CHUNK_ELEMS", 100)  # several column chunks
    case = make_case(0, "jumprelu", torch.bfloat16, d_in=24, d_sae=40)
    raw, w = case.raw, case.weights
    assert w.enc_t.shape == (40, 24) and w.enc_t.dtype == torch.bfloat16
    assert w.enc_t.is_contiguous() and w.W_dec.is_contiguous()
    assert torch.equal(w.enc_t.double(), torch.from_numpy(raw["W_enc"]).T)
    assert w.W_dec.dtype == torch.bfloat16 and w.b_enc.dtype == torch.float32
    folded = raw["b_enc"] - raw["b_dec"] @ raw["W_enc"]
    assert np.array_equal(w.b_enc.double().numpy(), folded.astype(np.float32))
    assert np.array_equal(w.threshold.numpy(), raw["threshold"].astype(np.float32))
    assert w.k == 0 and (w.d_in, w.d_sae) == (24, 40)


def test_prepare_weights_defaults_and_validation():
    W_enc, W_dec = torch.randn(8, 16), torch.randn(16, 8)
    b_enc, b_dec = torch.randn(16), torch.randn(8)
    w = prepare_weights(W_enc, b_enc, W_dec, b_dec, None, 3, False, torch.float32, "cpu")
    assert torch.equal(w.threshold, torch.zeros(16)) and w.k == 3
    assert torch.equal(w.b_enc, b_enc)  # no fold without apply_b_dec_to_input
    with pytest.raises(ValueError, match="W_dec"):
        prepare_weights(W_enc, b_enc, W_dec.T, b_dec, None, None, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="threshold"):
        prepare_weights(
            W_enc, b_enc, W_dec, b_dec, torch.zeros(3), None, True, torch.float32, "cpu"
        )


@pytest.mark.parametrize(
    ("name", "spoil", "dtype"),
    [
        ("b_dec", lambda t: t["b_dec"].__setitem__(2, float("nan")), torch.float32),
        ("b_enc", lambda t: t["b_enc"].__setitem__(0, float("inf")), torch.float32),
        ("W_dec", lambda t: t["W_dec"].__setitem__((5, 1), float("nan")), torch.bfloat16),
        ("W_enc", lambda t: t["W_enc"].__setitem__((1, 9), -float("inf")), torch.float32),
        ("W_enc", lambda t: t["W_enc"].__setitem__((1, 9), 70000.0), torch.float16),  # past fp16
        ("threshold", lambda t: t["threshold"].__setitem__(4, float("nan")), torch.float32),
        (  # finite in float64, past float32, in which the op reads it
            "b_enc with b_dec folded in",
            lambda t: t.__setitem__(
                "b_enc", t["b_enc"].double().index_fill(0, torch.tensor([3]), 1e300)
            ),
            torch.float32,
        ),
    ],
)
def test_prepare_weights_refuses_non_finite_weights(name, spoil, dtype):
    """One NaN in b_dec silences every feature (every pre-activation is NaN, and NaN is never
    above the threshold); one in W_dec writes NaN into the residual stream. Refused, named."""
    tensors = {
        "W_enc": torch.randn(8, 16),
        "b_enc": torch.randn(16),
        "W_dec": torch.randn(16, 8),
        "b_dec": torch.randn(8),
        "threshold": torch.rand(16),
    }
    prepare_weights(*tensors.values(), None, True, dtype, "cpu")  # fine as drawn
    spoil(tensors)
    with pytest.raises(ValueError, match=f"^{name}.* holds 1 NaN or infinite values"):
        prepare_weights(*tensors.values(), None, True, dtype, "cpu")


def test_prepare_weights_never_shares_memory_with_its_inputs():
    # Even where layout, dtype and device already match: the inputs may be a memory-mapped file.
    W_enc, W_dec = torch.randn(16, 8).T, torch.randn(16, 8)
    b_enc, threshold = torch.randn(16), torch.rand(16)
    w = prepare_weights(W_enc, b_enc, W_dec, torch.randn(8), threshold, None, False,
                        torch.float32, "cpu")  # fmt: skip
    assert torch.equal(w.W_dec, W_dec) and torch.equal(w.enc_t, W_enc.T)
    assert torch.equal(w.b_enc, b_enc) and torch.equal(w.threshold, threshold)
    pairs = ((w.W_dec, W_dec), (w.enc_t, W_enc), (w.b_enc, b_enc), (w.threshold, threshold))
    for built, source in pairs:
        assert built.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


def test_prepare_weights_by_block_checks_every_block(monkeypatch):
    monkeypatch.setattr(weights_module, "_CHUNK_ELEMS", 8 * 4)  # blocks of 4 features
    b_enc, b_dec = torch.zeros(12), torch.zeros(8)

    def block(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows.stop - rows.start
        short = 7 if rows.start == 8 else 8  # the third block's columns are one row short
        return torch.zeros(short, n), torch.zeros(n, 8)

    with pytest.raises(ValueError, match=r"W_enc \(columns 8:12\) has shape \(7, 4\)"):
        prepare_weights_by_block(block, b_enc, b_dec, None, None, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="1-D"):
        prepare_weights_by_block(block, b_enc[None], b_dec, None, None, True, torch.float32, "cpu")


# ---------------------------------------------------------------------------------------------
# Both implementations against the oracle


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("residual", [True, False], ids=["hidden+residual", "single"])
def test_matches_oracle(runner: Runner, arch: str, dtype: torch.dtype, residual: bool):
    case = make_case(1, arch, dtype, residual=residual)
    expected = oracle(case)
    got = run_case(case, runner)
    assert_matches_oracle(case, got, expected)
    changed = (got.double().numpy() != case.hidden.double().numpy()).any(axis=1)
    assert changed.sum() >= 3, "the case must actually steer several tokens"


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_working_copy_of_a_low_precision_model(
    runner: Runner, arch: str, model_dtype: torch.dtype
):
    """The steered layer of a bf16/fp16 model hands the op a float32 copy of its output, with
    the residual and the weights in the model's dtype: the result is the oracle's, in float32."""
    case = make_case(4, arch, model_dtype)
    case.hidden_buf = case.hidden_buf.float()
    if model_dtype == torch.bfloat16:
        weights = (case.weights.enc_t, case.weights.W_dec)
        assert cpu_decode_module.compiled_path_applies(case.hidden, case.residual, *weights)
    got = run_case(case, runner)
    assert got.dtype == torch.float32
    assert_matches_oracle(case, got, oracle(case))
    changed = (got.double().numpy() != case.hidden.double().numpy()).any(axis=1)
    assert changed.sum() >= 3, "the case must actually steer several tokens"


def test_topk_case_needs_membership():
    """The TopK cases above include edited features with pre > 0 outside the top k, where
    relu(pre) alone would be the wrong activation, and features inside it."""
    case = make_case(1, "topk")
    members = outside = 0
    feats = case.row_feat.numpy()
    hidden = case.hidden.double().numpy() + case.residual.double().numpy()
    for t in np.flatnonzero(case.steered()):
        pre, a = oracle_activations(case, hidden[t])
        slots = feats[case.tok_row[t].item()]
        slots = slots[slots >= 0]
        members += int((a[slots] > 0).sum())
        outside += int(((pre[slots] > 0) & (a[slots] == 0)).sum())
    assert members > 0 and outside > 0


@pytest.mark.parametrize("n_slots", [1, 2, 5, 8, 17, 32])
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_slot_counts(runner: Runner, arch: str, n_slots: int):
    case = make_case(2 + n_slots, arch, torch.float32, d_in=56, d_sae=96, n_tok=6,
                     n_rows=3, n_slots=n_slots, empty_share=0.1)  # fmt: skip
    assert_matches_oracle(case, run_case(case, runner), oracle(case))


@pytest.mark.parametrize(
    "launch",
    [
        {"block_d": 16, "split_d": 1},
        {"block_d": 16, "split_d": 3},
        {"block_d": 32, "split_d": 2, "block_f": 16, "split_f": 3},
        {"block_d": 16, "split_d": 6, "block_t": 16, "block_f": 32, "split_f": 1},
    ],
    ids=lambda launch: "-".join(f"{k}{v}" for k, v in launch.items()),
)
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_triton_block_and_split_sizes(interp, arch: str, launch: dict[str, int]):
    """Partial sums over several d_in splits, and the count kernel over several feature tiles."""
    case = make_case(3, arch, torch.bfloat16, d_in=96, d_sae=112, n_tok=20, n_rows=4)
    assert_matches_oracle(case, run_case(case, triton_runner(interp, **launch)), oracle(case))


def test_reference_gather_and_chunked_paths(monkeypatch):
    """The reference's per-token gather path, several token chunks and TopK feature chunks."""
    monkeypatch.setattr(reference_module, "_DENSE_FACTOR", 0)
    monkeypatch.setattr(reference_module, "_ELEMS", 300)
    for arch in ARCHS:
        case = make_case(4, arch, torch.float16, d_in=48, d_sae=64, n_tok=10)
        assert_matches_oracle(case, run_case(case, run_reference), oracle(case))


def test_fp32_continuous_weights(runner: Runner):
    """Off-grid weights (rounding in every dot): still within fp32 accumulation error."""
    case = make_case(5, "jumprelu", torch.float32, d_in=72, d_sae=100)
    rng = np.random.default_rng(5)
    for name in ("W_enc", "W_dec"):
        case.raw[name] = case.raw[name] + rng.normal(0, 1e-3, case.raw[name].shape)
    raw = case.raw
    tensors = (torch.from_numpy(raw[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    weights = prepare_weights(*tensors, torch.from_numpy(raw["threshold"]), None, True,
                              torch.float32, "cpu")  # fmt: skip
    case = replace(case, weights=weights)
    got = run_case(case, runner)
    np.testing.assert_allclose(got.double().numpy(), oracle(case), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Memory that must not be touched, bad indices


def test_unsteered_tokens_bit_identical(runner: Runner):
    """NaN, inf and -0.0 in unsteered and padded tokens come back with the same bits, also when
    the padded tail's token rows point at valid rows and hidden is a strided view."""
    case = make_case(6, "relu", torch.bfloat16, n_tok=10, pad=4)
    wide = torch.zeros(case.hidden_buf.shape[0], case.hidden_buf.shape[1] + 5, dtype=torch.bfloat16)
    wide[:, : case.hidden_buf.shape[1]] = case.hidden_buf
    steered = torch.from_numpy(case.steered())
    specials = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
    wide[: case.n_tok][~steered, :4] = specials.to(torch.bfloat16)
    wide[case.n_tok :, :4] = specials.to(torch.bfloat16)
    wide[:, -5:] = float("nan")
    before = wide.clone()
    case = replace(case, hidden_buf=wide[:, : case.hidden_buf.shape[1]])
    runner(case, case.hidden)
    assert _bits(wide[: case.n_tok][~steered]).equal(_bits(before[: case.n_tok][~steered]))
    assert _bits(wide[case.n_tok :]).equal(_bits(before[case.n_tok :]))
    assert _bits(wide[:, -5:]).equal(_bits(before[:, -5:]))
    assert not torch.equal(wide[: case.n_tok][steered], before[: case.n_tok][steered])


def test_tokens_whose_row_holds_no_edit_of_this_sae_keep_their_bits(runner: Runner):
    """A spec that edits only another SAE gives its tokens rows with every slot of this SAE's
    table empty: this op leaves them as they are, -0.0 and NaN included."""
    case = make_case(16, "relu", torch.bfloat16, n_tok=10)
    steered = torch.from_numpy(case.steered())
    empty_row = int(case.tok_row[: case.n_tok][steered][0])
    case.row_feat[empty_row] = -1
    no_edit = case.tok_row[: case.n_tok] == empty_row
    specials = torch.tensor([float("nan"), -0.0, -0.0, float("-inf")], dtype=torch.bfloat16)
    case.hidden[no_edit, :4] = specials
    before = case.hidden.clone()
    runner(case, case.hidden)
    assert _bits(case.hidden[no_edit]).equal(_bits(before[no_edit]))
    assert not torch.equal(case.hidden[steered & ~no_edit], before[steered & ~no_edit])


def test_passthrough_edits_are_bit_exact(runner: Runner):
    """Edits that keep a (scale 1, add 0) change no value (-0.0 may come back as +0.0)."""
    case = make_case(7, "relu", torch.float16)
    case.row_op.fill_(OP_CODES["scale"])
    case.row_val.fill_(1.0)
    case.row_op[:, ::2] = OP_CODES["add"]
    case.row_val[:, ::2] = 0.0
    got = run_case(case, runner)
    assert torch.equal(got, case.hidden)


def test_bad_rows_features_and_ops_never_crash(runner: Runner):
    """Rows past the table or far negative, feature ids past d_sae or below -1, unknown op
    codes: treated as unsteered tokens, empty slots and no-op edits."""
    case = make_case(8, "jumprelu", torch.float32, n_tok=12, n_rows=4, n_slots=5)
    case.tok_row[:4] = torch.tensor([4, 1_000_000, -7, -(2**31)], dtype=torch.int32)
    case.row_feat[0, :3] = torch.tensor([128, 2**31 - 1, -5], dtype=torch.int32)
    case.row_op[1, :2] = torch.tensor([6, -1], dtype=torch.int32)
    expected = oracle(case)
    got = run_case(case, runner)
    assert_matches_oracle(case, got, expected)
    assert _bits(got[:4]).equal(_bits(case.hidden[:4]))


def test_no_steered_tokens_and_empty_batch(runner: Runner):
    case = make_case(9, "topk", torch.bfloat16)
    case.tok_row.fill_(-1)
    assert _bits(run_case(case, runner)).equal(_bits(case.hidden))
    empty = replace(case, hidden_buf=case.hidden_buf[:0], residual=None, n_tok=0)
    runner(empty, empty.hidden)  # T = 0 must be a no-op, not an error


# ---------------------------------------------------------------------------------------------
# Property-based


@st.composite
def random_cases(draw) -> Case:
    n_slots = draw(st.integers(1, 8))
    return make_case(
        seed=draw(st.integers(0, 2**31 - 1)),
        arch=draw(st.sampled_from(ARCHS)),
        dtype=draw(st.sampled_from(DTYPES)),
        d_in=draw(st.integers(16, 96)),
        d_sae=draw(st.integers(max(n_slots, 32), 160)),
        n_tok=draw(st.integers(1, 10)),
        n_rows=draw(st.integers(1, 4)),
        n_slots=n_slots,
        residual=draw(st.booleans()),
        apply_b_dec=draw(st.booleans()),
        pad=draw(st.integers(0, 3)),
        k=draw(st.integers(1, 40)),
        empty_share=draw(st.sampled_from([0.0, 0.3])),
    )


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=random_cases())
def test_random_cases(interp, case: Case):
    expected = oracle(case)
    assert_matches_oracle(case, run_case(case, run_reference), expected)
    assert_matches_oracle(case, run_case(case, triton_runner(interp)), expected)


# ---------------------------------------------------------------------------------------------
# The registered op


def test_op_and_wrapper_dispatch_to_the_cpu_path_on_cpu():
    case = make_case(10, "jumprelu", torch.bfloat16)
    expected = run_case(case, run_cpu)
    via_op = case.hidden.clone()
    torch.ops.sae_vllm.steer_(*case.op_args(via_op))
    via_wrapper = case.hidden.clone()
    kpkg.steer_(via_wrapper, case.residual, case.weights, case.row_feat, case.row_val,
                case.row_op, case.tok_row, case.tok_scope)  # fmt: skip
    assert torch.equal(via_op, expected) and torch.equal(via_wrapper, expected)
    assert not torch.equal(expected, case.hidden)


def test_op_under_torch_compile_matches_eager():
    case = make_case(11, "topk", torch.float32)
    single = make_case(12, "relu", torch.float32, residual=False)

    def step(hidden, residual, other_hidden, *tables):
        out = hidden.clone()
        torch.ops.sae_vllm.steer_(out, residual, *tables[0])
        other = other_hidden.clone()
        torch.ops.sae_vllm.steer_(other, None, *tables[1])
        return out * 2.0 + 1.0, other - 3.0

    def inputs():
        return (
            case.hidden, case.residual, single.hidden,
            case.op_args(case.hidden)[2:], single.op_args(single.hidden)[2:],
        )  # fmt: skip

    eager = step(*inputs())
    compiled = torch.compile(step, fullgraph=True)(*inputs())
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)
    assert not torch.equal(eager[0], case.hidden * 2.0 + 1.0)
    assert not torch.equal(eager[1], single.hidden - 3.0)


@pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba (vLLM's) not installed here"
)
def test_warm_up_compiles_the_loop_for_eager_and_compiled_layers():
    """A bfloat16 model's steered layer hands the loop its own output when run eagerly and a
    float32 copy when torch.compile'd; worker start compiles both (in a fresh process, so no
    other test has compiled them), not the first steered step."""
    script = (
        f"import importlib, torch; m = importlib.import_module('{kpkg.__name__}.cpu_compiled'); "
        "m.warm_up(torch.bfloat16); "
        "print(sorted({str(sig[0].dtype) for sig in m._loop().steer_tokens.signatures}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "['float32', 'uint16']"  # uint16: bfloat16's bits


def test_cpu_op_falls_back_to_numpy_when_the_compiled_loop_cannot_be_built(monkeypatch):
    """A broken numba install, simulated (this machine's numba works): the engine keeps going
    on the numpy path instead of failing at worker start."""
    compiled = importlib.import_module(f"{kpkg.__name__}.cpu_compiled")

    def broken(*args):
        raise ImportError("numba: simulated broken install")

    monkeypatch.setattr(compiled, "NUMBA_AVAILABLE", True)
    monkeypatch.setattr(compiled, "steer_compiled_", broken)
    compiled.warm_up(torch.float32)  # logs instead of raising
    assert compiled.NUMBA_AVAILABLE is False
    hidden = torch.zeros(2, 4)
    assert not compiled.compiled_path_applies(hidden, None, hidden, hidden)
