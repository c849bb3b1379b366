"""Side-by-side timing for the benchmark scripts: interleaved repetitions, medians.

Running the compared variants in turn (A, B, C, A, B, C, ...) and taking medians keeps
their ratios honest on a noisy, shared machine; absolute times are only indicative.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int = 15, inner: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each variant, timed in interleaved rounds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
