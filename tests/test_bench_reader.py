"""``benchmarks/bench_reader.py`` runs through at tiny sizes and produces every number it promises (a smoke
test of the script, not of speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_reader_prints_and_records_its_numbers(tmp_path, capsys, cache_dir):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_reader
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "reader.json"
    args = ["--samples", "12", "--samples-per-shard", "5", "--patches", "16", "--dim", "32", "--top-k", "4"]
    args += ["--workers", "0,1", "--batch-size", "2", "--buffers", "3", "--runs", "2", "--json", str(out)]
    args += ["--dir", str(tmp_path)]
    result = bench_reader.main(args)
    printed = capsys.readouterr().out

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["samples"] == 12 and result["runs"] == 2
    names = [row["what"] for row in result["rows"]]
    assert names == [
        "disk: raw read, one buffer",
        "disk: raw read, 256 samples kept",
        "reader, 1 process, shuffle buffer 1",
        "reader, 1 process, shuffle buffer 256",
        "loader, 0 workers (float32 batches)",
        "loader, 1 workers (float32 batches)",
        "loader, 0 workers (float16 batches)",
        "loader, 1 workers (float16 batches)",
    ]
    per_sample = result["bytes"] / result["samples"]
    for row in result["rows"]:
        assert len(row["samples_per_s"]) == 2 and all(r > 0 for r in row["samples_per_s"])
        assert row["mb_per_s"] == [r * per_sample / 1e6 for r in row["samples_per_s"]]
        assert row["ratio_disk"] == [
            r / d for r, d in zip(row["samples_per_s"], result["rows"][0]["samples_per_s"])
        ]
        assert len(row["first_batch_s"]) == (2 if row["what"].startswith("loader") else 0)
        # min / median / max of the two runs, in the printed table
        assert (
            f"| {row['what']} | " in printed
            and " / " in printed.split(f"| {row['what']} | ")[1].split("\n")[0]
        )
    (memory,) = result["buffer_memory"]
    assert memory["buffer"] == 3 and memory["bytes"] > 0
    assert "warm (from the page cache)" in printed and "goals: loader >= 220 samples/s" in printed
    assert not any(p.name.startswith("bench-reader-") for p in tmp_path.iterdir())  # its shards are removed
