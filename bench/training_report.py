"""What the training benchmarks (train_demo.py, train_reference.py) write the same way."""

from __future__ import annotations

from pathlib import Path

PAIRS_HEADER = """A few test pairs (user, item, rating, predicted, reference, generated):

| user | item | rating | predicted | reference | generated |
|---|---|---|---|---|---|"""


def pairs_table(report, num_pairs: int = 8) -> str:
    """The first evaluated pairs of an EvalReport as a markdown table, with its heading."""
    rows = [
        f"| {p.user} | {p.item} | {p.rating:g} | {p.predicted_rating:.2f} | {p.reference} | "
        f"{p.generated} |"
        for p in report.pairs[:num_pairs]
    ]
    return "\n".join([PAIRS_HEADER, *rows])


def write_results(path: Path, text: str) -> None:
    """Replaces the results file atomically: a crash never leaves half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(path.suffix + ".tmp")
    tmp_path.write_text(text, encoding="utf-8")
    tmp_path.replace(path)
