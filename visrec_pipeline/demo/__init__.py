"""The bundled demo dataset: a deterministic, Wikimedia-Commons-like generator (no dagster here)."""

from visrec_pipeline.demo.generate import (
    GENERATOR_VERSION,
    MARKER,
    BatchSummary,
    DemoSummary,
    ensure_demo_dataset,
    ensure_demo_summary,
    generate_demo_dataset,
    load_demo_summary,
)

__all__ = [
    "GENERATOR_VERSION",
    "MARKER",
    "BatchSummary",
    "DemoSummary",
    "ensure_demo_dataset",
    "ensure_demo_summary",
    "generate_demo_dataset",
    "load_demo_summary",
]
