"""Small synthetic head-score files and sweep results for the analysis, command and report tests."""
from __future__ import annotations

import json
from pathlib import Path

# 2 layers x 5 heads; each list is [2m, 0] so the mean is exactly m (halving is exact in binary floats).
MEANS = [[0.0, 0.0, 0.0, 0.05, 0.1],
         [0.3, 0.5, 0.9, 1.2, 0.0]]


def file_from_means(means, tests: int = 2) -> dict[str, list[float]]:
    assert tests == 2
    return {f"{l}-{h}": [2 * m, 0.0] for l, row in enumerate(means) for h, m in enumerate(row)}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_results(tmp_path: Path) -> Path:
    """Synthetic sweep, 1 layer x 4 heads: 10 kept tests (needles 0/1, lengths 100/200) + 2 dropped ones.

    head 0-0: 0.5 in every kept test -> retrieval, always-on
    head 0-1: 1.0 in the 5 needle-1 tests only -> mean 0.5, retrieval, context-specific (50%)
    head 0-2: 0.05 everywhere -> active 100% but mean 0.05: not a retrieval head
    head 0-3: 0 in kept tests, 9.0 in dropped tests (must be ignored)
    """
    rows = []
    for i in range(10):
        needle, length = i % 2, 100 if i < 5 else 200
        rows.append({"key": f"L{length}_D{i}_N{needle}", "length": length, "depth": 10 * i, "needle_index": needle,
                     "rouge1_recall": 1.0, "kept": True,
                     "scores": [[0.5, 1.0 if needle == 1 else 0.0, 0.05, 0.0]]})
    for i in range(2):
        rows.append({"key": f"L100_D0_N{i}", "length": 100, "depth": 0, "needle_index": i, "rouge1_recall": 0.0,
                     "kept": False, "scores": [[0.0, 0.0, 0.0, 9.0]]})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
