"""Which weights a backbone is built with, and a tag that says so everywhere downstream.

``weights`` is one of:

- ``imagenet``: the torchvision ImageNet weights of the spec (honours ``TORCH_HOME``: the
  cached file ``torch.hub.get_dir()/checkpoints/<name from weights.url>`` is used when present,
  otherwise downloaded with a short socket timeout and its SHA-256 prefix checked);
- ``random``: torchvision's own initialisation after ``torch.manual_seed(seed)`` (kept in an
  optional cache folder, so later builds load it instead of re-running the initialisation);
- ``auto``: ImageNet when loadable, otherwise random init with a loud warning;
- a path to a state dict file (``torch.load(weights_only=True)``).

Tags: ``imagenet:IMAGENET1K_V2``, ``random:seed=0``, ``file:<sha256[:16]>`` (a file is named by
its content, so replacing it recomputes the features).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from visrec_pipeline.atomic import atomic_path
from visrec_pipeline.embeddings.backbones import BackboneSpec

log = logging.getLogger(__name__)

# Set to skip download attempts entirely (cache only) on machines known to be offline.
OFFLINE_ENV = "VISREC_OFFLINE"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torchvision's file naming: <name>-<sha256 prefix>.pth


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights neither cached nor downloadable."""


@dataclass(frozen=True)
class WeightsChoice:
    setting: str  # what was asked for
    tag: str  # what was used, machine-readable; stored with every feature row
    used: str  # what was used, for people
    warning: str | None = None


def imagenet_cache_path(weights: WeightsEnum) -> Path:
    """Where torch.hub keeps (and torchvision looks for) the weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def weights_url(weights: WeightsEnum) -> str:
    """The download address (a function so tests can point it at a local server)."""
    return weights.url


def _download(url: str, target: Path, timeout_s: float) -> None:
    """Stream ``url`` into ``target`` atomically; the SHA-256 prefix in the file name must match."""
    expected = _HASH_IN_NAME.search(target.name)
    digest = hashlib.sha256()
    req = urllib.request.Request(url, headers={"User-Agent": "visrec-pipeline"})
    with atomic_path(target) as tmp:
        # The timeout bounds each socket operation (connect, every read), so a dead network fails fast.
        with urllib.request.urlopen(req, timeout=timeout_s) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            raise WeightsUnavailableError(
                f"downloaded {url} has SHA-256 {digest.hexdigest()[:16]}..., expected prefix {expected.group(1)}"
            )


def fetch_imagenet_state_dict(weights: WeightsEnum, *, download_timeout_s: float = 10.0) -> dict:
    cached = imagenet_cache_path(weights)
    if not cached.is_file():
        url = weights_url(weights)
        if os.environ.get(OFFLINE_ENV):
            raise WeightsUnavailableError(f"{weights} is not cached at {cached} and {OFFLINE_ENV} is set")
        try:
            _download(url, cached, download_timeout_s)
        except WeightsUnavailableError:
            raise
        except Exception as exc:  # network errors come in many types (URLError, timeout, HTTP, OSError)
            raise WeightsUnavailableError(
                f"{weights} is not cached at {cached} and downloading {url} failed: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot load cached weights {cached}: {exc}") from exc


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _empty_model(spec: BackboneSpec) -> nn.Module:
    """The architecture with its tensors on the meta device: no initialisation is run (0.2-0.3 s
    for ResNet-50 / AlexNet on CPU) for values a state dict replaces anyway."""
    with torch.device("meta"):
        return spec.builder(weights=None)


def _load_state_dict(model: nn.Module, state: object, source: str) -> None:
    """Load ``state`` into ``model`` (which may be on the meta device: its tensors are then the state's)."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{source} does not fit {type(model).__name__}: {exc}") from exc


def _state_model(spec: BackboneSpec, state: object, source: str) -> nn.Module:
    """``spec``'s model holding ``state``."""
    model = _empty_model(spec)
    _load_state_dict(model, state, source)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # a buffer no state dict carries (non-persistent) stayed uninitialised: the slow way
        model = spec.builder(weights=None)
        _load_state_dict(model, state, source)
    return model


def random_init_cache_path(cache_dir: str | os.PathLike, spec: BackboneSpec, seed: int) -> Path:
    """The cached initialisation of ``spec`` for ``seed``; torch's RNG and torchvision's init code define it."""
    builder = f"{spec.builder.__module__}.{spec.builder.__qualname__}"
    return Path(cache_dir) / f"{builder}-seed{int(seed)}-torch{torch.__version__}-torchvision{torchvision.__version__}.pt"


def random_model(spec: BackboneSpec, seed: int, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """torchvision's initialisation, reproducible: the global RNG is seeded inside a fork and restored.

    With ``cache_dir`` the initialised state dict is saved there once and loaded (memory-mapped) by
    later builds: running the initialisation costs 0.2-0.3 s per build on CPU, a third of what a
    small incremental extraction costs in all. An unreadable cache file is rebuilt."""
    path = random_init_cache_path(cache_dir, spec, seed) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return _state_model(spec, torch.load(path, map_location="cpu", weights_only=True, mmap=True), str(path))
        except Exception as exc:  # a truncated or foreign file: fall through and rebuild it
            log.warning(f"random-init cache {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.builder(weights=None)
    if path is not None:
        try:
            with atomic_path(path) as tmp:
                torch.save(model.state_dict(), tmp)
        except OSError as exc:  # read-only or full disk: the cache is an optimisation only
            log.warning(f"could not write random-init cache {path}: {exc}")
    return model


def build_model(
    spec: BackboneSpec,
    weights: str = "auto",
    *,
    seed: int = 0,
    download_timeout_s: float = 10.0,
    init_cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, WeightsChoice]:
    """The backbone in eval mode on the CPU, and which weights it carries (``init_cache_dir``: see
    :func:`random_model`)."""
    name = spec.weights._name_
    if weights in ("imagenet", "auto"):
        try:
            state = fetch_imagenet_state_dict(spec.weights, download_timeout_s=download_timeout_s)
        except WeightsUnavailableError as exc:
            if weights == "imagenet":
                raise
            choice = WeightsChoice(
                weights,
                f"random:seed={seed}",
                f"random init (seed {seed}) - ImageNet weights unavailable",
                warning=(
                    f"{spec.name}: ImageNet weights {name} could not be loaded ({exc}); features come from a "
                    f"RANDOMLY INITIALISED network (seed {seed}) and carry no learned visual semantics. Put the file "
                    f"at {imagenet_cache_path(spec.weights)} (or set weights to a state dict path) and re-run."
                ),
            )
            return random_model(spec, seed, init_cache_dir).eval(), choice
        model = _state_model(spec, state, f"cached ImageNet weights {imagenet_cache_path(spec.weights)}")
        return model.eval(), WeightsChoice(weights, f"imagenet:{name}", f"ImageNet ({spec.weights})")
    if weights == "random":
        model = random_model(spec, seed, init_cache_dir)
        return model.eval(), WeightsChoice(weights, f"random:seed={seed}", f"random init (seed {seed})")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights setting {weights!r} is neither imagenet|random|auto nor an existing state dict file"
        )
    model = _state_model(spec, torch.load(path, map_location="cpu", weights_only=True), f"weights file {path}")
    digest = _file_digest(path)
    return model.eval(), WeightsChoice(weights, f"file:{digest[:16]}", f"state dict {path} (sha256 {digest[:16]})")
