"""Int8 feature extraction on CPU: post-training static quantization of a feature extractor.

torchao's PT2E flow (``torch.export``, the X86 quantizer: int8 per-channel weights, uint8 activations,
histogram-calibrated ranges) lowered to oneDNN's int8 convolution / linear kernels. The lowering is
graph rewriting only, so no C++ compiler is needed at run time (``torch.compile`` would need one).
On a 2-core AVX512-VNNI CPU the ResNet-50 extractor runs about 1.6x faster than the fused bf16 graph;
pooled features keep a cosine of about 0.9998 to fp32 (spatial maps about 0.999).

The quantized model depends on its calibration images. They are stored with the features
(:func:`visrec_pipeline.embeddings.store.calibration_path`) and every run recalibrates from that same
stored array, so features computed in different (incremental) runs come from the same quantized
model, bit for bit.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx
from torch import nn

from visrec_pipeline.atomic import atomic_open

log = logging.getLogger(__name__)

# Calibration images. With 64, held-out images keep a pooled cosine to fp32 of 0.9997 or more
# (bench/embeddings.py); each run pays the calibration pass, the fp32 model with observers (about 9 s
# for ResNet-50 on 2 cores), so more images would cost every run more.
CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 16
GRAPH_BATCH = 8  # images per call of the lowered graph (see Int8Extractor)


def _import_torchao() -> None:
    """Import torchao's PT2E modules. On import torchao registers enums with torch's pytree in a way
    this torch version logs a deprecation warning about, once per process; nothing a user can act on."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization.pt2e.lowering  # noqa: F401
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    finally:
        pytree_log.setLevel(level)


def unavailable_reason() -> str | None:
    """Why int8 cannot run here, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn) CPU backend"
    try:
        _import_torchao()
    except ImportError as exc:
        return f"torchao is not importable ({exc})"
    return None


def as_calibration(images: torch.Tensor) -> np.ndarray:
    """Preprocessed images as they are stored and calibrated from (float16): every run, the first
    included, calibrates from exactly what a later run will read back."""
    return images.detach().to(torch.float16).contiguous().numpy()


def save_calibration(path: Path, calibration: np.ndarray) -> None:
    """Store calibration images (atomically, no pickle)."""
    with atomic_open(path) as fh:
        np.save(fh, calibration, allow_pickle=False)


def load_calibration(path: Path) -> np.ndarray | None:
    """The stored calibration images, or None if there are none (or the file is unreadable)."""
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("int8 calibration %s is unreadable (%s); calibrating anew", path, exc)
        return None
    if arr.ndim != 4 or arr.shape[0] == 0:
        log.warning("int8 calibration %s has shape %s; calibrating anew", path, arr.shape)
        return None
    return arr


def _unshare_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` in which every module call has a module of its own. torchvision's ResNet calls
    one ReLU module three times per block; the quantizer groups nodes by the module that produced them
    and then refuses a group with several outputs ("Input partition has more than one output node")."""
    gm = copy.deepcopy(gm)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        n = calls.get(node.target, 0)
        calls[node.target] = n + 1
        if n:
            name = f"{node.target.replace('.', '_')}_call{n}"
            gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)))
            node.target = name
    gm.recompile()
    return gm


def _simplify(gm: torch.fx.GraphModule) -> int:
    """Two rewrites of the lowered graph that keep its values and save memory passes; returns how many.

    - ``dequantize(quantize(x))`` with the same parameters where ``x`` is float anyway (the observed
      model outputs): dropped, so the outputs are not rounded to 256 levels for nothing.
    - ``quantize(max_pool(dequantize(q)))`` with the same parameters: max pooling commutes with the
      monotone dequantization, so it runs on the 8-bit values (via bf16, which holds 0..255 exactly:
      uint8 channels-last max pooling fails in torch for large inputs) instead of a float copy of
      ResNet's largest activation.
    """
    qd = torch.ops.quantized_decomposed
    graph, changed = gm.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == qd.dequantize_per_tensor.default:
            src = node.args[0]
            if (
                isinstance(src, torch.fx.Node)
                and src.target == qd.quantize_per_tensor.default
                and tuple(src.args[1:]) == tuple(node.args[1:])
            ):
                node.replace_all_uses_with(src.args[0])
                graph.erase_node(node)
                changed += 1
                if not src.users:
                    graph.erase_node(src)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.max_pool2d_with_indices.default:
            continue
        deq, users = node.args[0], list(node.users)
        if not (
            isinstance(deq, torch.fx.Node)
            and deq.target == qd.dequantize_per_tensor.default
            and len(users) == 1
            and users[0].args[1] == 0  # only the values are used, not the indices
        ):
            continue
        values = users[0]
        requant = list(values.users)
        if not (
            len(requant) == 1
            and requant[0].target == qd.quantize_per_tensor.default
            and tuple(requant[0].args[1:]) == tuple(deq.args[1:])
        ):
            continue
        with graph.inserting_before(node):
            wide = graph.call_function(torch.ops.aten._to_copy.default, (deq.args[0],), {"dtype": torch.bfloat16})
            pooled = graph.call_function(torch.ops.aten.max_pool2d.default, (wide, *node.args[1:]))
            narrow = graph.call_function(torch.ops.aten._to_copy.default, (pooled,), {"dtype": torch.uint8})
        requant[0].replace_all_uses_with(narrow)
        for dead in (requant[0], values, node):
            graph.erase_node(dead)
        if not deq.users:
            graph.erase_node(deq)
        changed += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return changed


class Int8Extractor(nn.Module):
    """The lowered int8 graph, which is fixed to one (small) batch size: a batch runs as chunks of that
    size, the last chunk padded with zeros (each image's result does not depend on the others in its
    chunk). Measured on ResNet-50, 2 cores: 8, 16 and 32 images per call run alike (73-78 images/s),
    so chunks of 8 waste at most 7 padded images per extraction."""

    def __init__(self, lowered: nn.Module, graph_batch: int):
        super().__init__()
        self.lowered = lowered
        self.graph_batch = graph_batch

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, size = x.shape[0], self.graph_batch
        outs = []
        for lo in range(0, n, size):
            chunk = x[lo : lo + size]
            if chunk.shape[0] < size:
                pad = chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
            outs.append(self.lowered(chunk))
        return {k: torch.cat([o[k] for o in outs])[:n] for k in outs[0]}


def quantize_extractor(
    extractor: torch.fx.GraphModule, calibration: np.ndarray, graph_batch: int = GRAPH_BATCH
) -> Int8Extractor:
    """``extractor`` (an fp32 FX graph returning ``{"pooled", "spatial"?}``, eval mode) as an int8 graph
    run in chunks of ``graph_batch`` images, calibrated on ``calibration`` (preprocessed images,
    N x 3 x H x W). The result does not depend on ``graph_batch``."""
    _import_torchao()
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    images = torch.from_numpy(np.ascontiguousarray(calibration)).float().contiguous(memory_format=torch.channels_last)
    example = (torch.zeros((graph_batch, *images.shape[1:])).contiguous(memory_format=torch.channels_last),)
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings(), torch.no_grad():
        # torchao registers pytree enums the way this torch version deprecates; nothing to act on here
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        # the batch dimension stays dynamic until lowering, so that calibration runs in batches of its own
        # (the observers' histograms depend on how the images are batched, and must not depend on graph_batch)
        batch = torch.export.Dim("batch", min=1)
        exported = torch.export.export(
            _unshare_modules(extractor.eval()), example, dynamic_shapes=({0: batch},)
        ).module()
        # export leaves Dropout (AlexNet's classifier) in training mode
        prepared = move_exported_model_to_eval(prepare_pt2e(exported, quantizer))
        for lo in range(0, len(images), CALIBRATION_BATCH):
            prepared(images[lo : lo + CALIBRATION_BATCH])
        lowered = lower_pt2e_quantized_to_x86(convert_pt2e(prepared), example)
    _simplify(lowered)
    return Int8Extractor(lowered, graph_batch)

