"""Each parallel step gets its share of the cores; a run in one process keeps torch's default."""

from __future__ import annotations

import dagster as dg
import torch

from visrec_pipeline.defs.resources import MAX_CONCURRENT_STEPS, VisrecSettings, step_threads


def test_step_threads_share_the_cores_between_parallel_steps():
    assert MAX_CONCURRENT_STEPS == 2
    assert step_threads(0, 2, in_step_subprocess=True) == 1
    assert step_threads(0, 16, in_step_subprocess=True) == 8
    assert step_threads(0, 1, in_step_subprocess=True) == 1
    assert step_threads(0, None, in_step_subprocess=True) == 1
    assert step_threads(0, 16, in_step_subprocess=False) is None  # in-process run: torch's default
    assert step_threads(3, 16, in_step_subprocess=False) == 3  # an explicit setting always wins


def test_an_explicit_setting_is_applied_when_the_resource_is_set_up(tmp_path):
    before = torch.get_num_threads()
    seen = {}

    @dg.asset
    def probe(settings: VisrecSettings) -> None:
        seen["threads"] = torch.get_num_threads()

    try:
        settings = VisrecSettings(data_dir=str(tmp_path), dataset=str(tmp_path), torch_threads=1)
        assert dg.materialize([probe], resources={"settings": settings}).success
        assert seen["threads"] == 1
    finally:
        torch.set_num_threads(before)
