"""Issue 14, case 5: a checkpoint whose bytes changed is refused with its path, not scored silently
(a real workspace, models trained by the library, a real checkpoint file)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from test_pipeline_use_cases import BPR_CONFIG, ws  # noqa: F401  (the small trained workspace, as a fixture)
from visrec_pipeline.pipeline import checkpoint_path, evaluate_model, load_trained, recommend_all, train_model


def flip_bytes_in_the_largest_tensor(path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the largest tensor record of a torch zip file (same size)."""
    with zipfile.ZipFile(path) as zf:
        record = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as fh:
        fh.seek(record.header_offset + 26)
        name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
        at = record.header_offset + 30 + name_len + extra_len + record.file_size // 2 - n // 2
        fh.seek(at)
        data = fh.read(n)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_a_checkpoint_with_64_flipped_bytes_is_refused_with_its_path(ws):  # noqa: F811
    path = checkpoint_path(ws, "bpr_mf")
    train_model(ws, "bpr_mf", BPR_CONFIG)
    size = path.stat().st_size
    flip_bytes_in_the_largest_tensor(path)
    assert path.stat().st_size == size

    for use in (lambda: evaluate_model(ws, "bpr_mf"), lambda: recommend_all(ws, ["bpr_mf"], 3)):
        with pytest.raises(Exception, match="damaged") as refused:
            use()
        assert str(path) in str(refused.value) and "re-materialize model_bpr_mf" in str(refused.value)

    # training again writes a good checkpoint and its hash (in sha256sum's format: `sha256sum -c` checks it)
    train_model(ws, "bpr_mf", BPR_CONFIG)
    sidecar = path.with_name(path.name + ".sha256")
    assert sidecar.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    assert evaluate_model(ws, "bpr_mf").n_rows > 0


def test_a_checkpoint_from_before_hashes_loads_unverified(ws):  # noqa: F811
    path = checkpoint_path(ws, "most_popular")
    path.with_name(path.name + ".sha256").unlink(missing_ok=True)
    assert load_trained(ws, "most_popular").checkpoint["model_name"] == "most_popular"
