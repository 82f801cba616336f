"""Distributed execution of the heavy steps on a Ray cluster (feature extraction, training,
evaluation). Plain Python + Ray + torch: no Dagster import; the Dagster steps call into it when
the ``compute`` resource says ``ray``."""
