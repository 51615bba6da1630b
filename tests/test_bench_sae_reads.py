"""The SAE-read benchmark runs end to end and its two ways agree on the decoder norms."""

from __future__ import annotations

import json

from bench import sae_reads
from tiny_model import write_random_sae


def test_both_ways_are_measured_and_agree(tmp_path, capsys):
    write_random_sae(tmp_path / "sae", "relu", layer=1, d_sae=64)
    out = tmp_path / "reads.json"
    assert sae_reads.main([str(tmp_path / "sae"), "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["way"] for row in rows] == list(sae_reads.WAYS)
    assert len({row["norms_sum"] for row in rows}) == 1 and rows[0]["norms_sum"] > 0
    assert all(row["seconds"] > 0 for row in rows)
    assert "| sae | stream |" in capsys.readouterr().out
