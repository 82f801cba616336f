"""Issue 14, case 6: a full disk is reported as "No space left on device" with the file, the bytes it
needs and the bytes free; never a SIGBUS (feature shards) or torch's ``unexpected pos`` (checkpoints).

The real case uses a 1 MiB tmpfs (needs root and mount); the free-space check alone is also tested
with ``shutil.disk_usage`` reporting a nearly full disk, which runs anywhere."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

from visrec_pipeline.recsys.base import TrainHistory
from visrec_pipeline.recsys.checkpoint import load_checkpoint, save_checkpoint

COMMON = dict(model_name="m", config={}, data_versions={}, history=TrainHistory())

# writes a 600-item shard (1.5 MiB of ids, pooled and spatial) into the folder argv[1]; prints the OSError it gets
SHARD_SCRIPT = """
import sys
import numpy as np
from visrec_pipeline.embeddings.store import ShardWriter
ids = np.arange(600, dtype=np.int64)
try:
    with ShardWriter(sys.argv[1], "toy", "random:seed=0", ids) as writer:
        writer.write(np.arange(600), np.ones((600, 512), np.float32), np.ones((600, 4, 64), np.float16))
except OSError as exc:
    print(f"errno={exc.errno} {exc}")
    sys.exit(3)
print("written")
"""


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards; skipped where mounting is not permitted."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk_usage tests below cover the free-space checks")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here ({done.stderr.strip()}): the disk_usage tests cover the checks")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)  # lazy: a leaked open file must not keep it


def test_a_shard_that_does_not_fit_is_an_enospc_error_not_a_sigbus(tiny_disk):
    # a real process: before the check, writing the memory map on a full tmpfs killed it with SIGBUS
    done = subprocess.run([sys.executable, "-c", SHARD_SCRIPT, str(tiny_disk)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, f"exit {done.returncode} (negative: killed by that signal)\n{done.stdout}{done.stderr}"
    assert f"errno={errno.ENOSPC} [Errno {errno.ENOSPC}] No space left on device: writing" in done.stdout
    assert f"writing {tiny_disk / 'toy' / 'random_seed-0'}/" in done.stdout and ".pooled.npy needs 1.5 MiB" in done.stdout
    assert "1.0 MiB (1,048,576 bytes) free on its filesystem" in done.stdout
    assert not list(tiny_disk.rglob("*.npy")), "no temp file left on the full disk"


def test_a_checkpoint_that_does_not_fit_is_an_enospc_error_and_the_old_one_stays(tiny_disk):
    path = tiny_disk / "m" / "m.pt"
    save_checkpoint(path, state={"w": torch.ones(10)}, **COMMON)
    old = path.read_bytes()
    with pytest.raises(OSError) as full:
        save_checkpoint(path, state={"w": torch.ones(500_000)}, **COMMON)  # 2 MB
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(path)
    assert str(path) in str(full.value) and "needs 1.9 MiB" in str(full.value) and "free" in str(full.value)
    assert path.read_bytes() == old and torch.equal(load_checkpoint(path)["state"]["w"], torch.ones(10))
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt", "m.pt.sha256"]


Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def nearly_full(monkeypatch):
    """Every filesystem reports 1,000 bytes free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))


def test_free_space_is_checked_before_a_checkpoint_is_written(tmp_path, nearly_full):
    path = tmp_path / "m.pt"
    with pytest.raises(OSError, match=r"No space left on device: writing .*m\.pt needs .* 1,000 bytes free") as full:
        save_checkpoint(path, state={"w": torch.ones(1000)}, **COMMON)
    assert full.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


def test_free_space_is_checked_before_a_shard_is_written(tmp_path, nearly_full):
    from visrec_pipeline.embeddings.store import ShardWriter

    with pytest.raises(OSError, match="No space left on device: writing .*pooled.npy needs") as full:
        with ShardWriter(tmp_path, "toy", "t", np.arange(10)) as writer:
            writer.write(np.arange(10), np.ones((10, 8), np.float32), None)
    assert full.value.errno == errno.ENOSPC
    assert not list(tmp_path.rglob("*.npy"))
