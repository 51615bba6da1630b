"""The SAE-read benchmark runs end to end; each pair of ways agrees (norms; weights' bytes)."""

from __future__ import annotations

import json

from bench import sae_reads
from tiny_model import write_random_sae


def test_every_way_is_measured_and_each_pair_agrees(tmp_path, capsys):
    write_random_sae(tmp_path / "sae", "relu", layer=1, d_sae=64)
    out = tmp_path / "reads.json"
    assert sae_reads.main([str(tmp_path / "sae"), "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["way"] for row in rows] == list(sae_reads.WAYS)
    norms, weights = rows[:2], rows[2:]
    assert len({row["check"] for row in norms}) == 1 and norms[0]["check"] > 0
    assert len({row["check"] for row in weights}) == 1 and len(weights[0]["check"]) == 64
    assert all(row["seconds"] > 0 for row in rows)
    printed = capsys.readouterr().out
    assert "| sae | stream |" in printed and "| sae | weights_streamed |" in printed
    assert "bfloat16 on the CPU" in printed
