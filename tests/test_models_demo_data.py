"""The models on a small dataset from the demo generator (not planted features): DVBPR, CuratorNet
(guided triples) and ACF learn (their loss falls), the visual models beat the baselines, and ACF's
attentions do not collapse.

Features come from a random-init ResNet-50 (what the demo uses when ImageNet weights are
offline) at a reduced input size, so the whole module runs in well under a minute on one core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from visrec_pipeline.demo import generate_demo_dataset
from visrec_pipeline.embeddings.backbones import get_backbone
from visrec_pipeline.embeddings.kmeans import kmeans
from visrec_pipeline.embeddings.weights import random_model
from visrec_pipeline.recsys.base import FitInputs
from visrec_pipeline.recsys.data import RecData
from visrec_pipeline.recsys.evaluate import evaluate
from visrec_pipeline.recsys.guided_sampler import build_guided_triples
from visrec_pipeline.recsys.models.acf import ACF, ACFConfig
from visrec_pipeline.recsys.models.baselines import MostPopular, MostPopularConfig, RandomConfig, RandomRecommender
from visrec_pipeline.recsys.models.curatornet import CuratorNet, CuratorNetConfig
from visrec_pipeline.recsys.models.dvbpr import DVBPR, DVBPRConfig
from visrec_pipeline.recsys.models.vbpr import VBPR, VBPRConfig
from visrec_pipeline.recsys.models.visrank import VisRank, VisRankConfig

IMAGE_SIZE = 64  # CNN input: ResNet-50's layer4 is then a 2 x 2 region grid
ACF_IMAGE_SIZE = 128  # ACF's attention test: a 4 x 4 grid, with border and inner regions like the demo's 7 x 7
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class DemoWorld:
    data: RecData  # training rows + last-1 holdout
    fit: RecData  # training rows minus the validation rows
    images: torch.Tensor  # uint8 [n_items, 3, S, S]
    features: np.ndarray  # pooled [n_items, 2048]
    spatial: np.ndarray  # float16 [n_items, regions, 2048]
    creators: np.ndarray
    clusters: np.ndarray
    image_paths: list

    def inputs(self, validation: bool = True) -> FitInputs:
        fit, val = self.data.validation_split()
        return FitInputs(
            features=self.features,
            feature_mask=np.ones(len(self.features), bool),
            spatial=self.spatial,
            images=lambda idx: self.images[idx],
            creators=self.creators,
            clusters=self.clusters,
            validation=val if validation else None,
        )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(frame: pd.DataFrame, item_ids: np.ndarray) -> RecData:
    """evaluation.md: latest row per pair, ordered by time (ties: item, user), each user's last row held out."""
    frame = frame.sort_values(["ts", "item_id", "user_id"]).drop_duplicates(["user_id", "item_id"], keep="last")
    last = frame.groupby("user_id").tail(1)
    counts = frame.groupby("user_id")["item_id"].transform("size")
    held = frame.index.isin(last.index) & (counts > 1).to_numpy()
    train, test = frame[~held], frame[held]
    profiles = train.groupby("user_id")["item_id"].apply(list)
    holdout = pd.DataFrame(
        {
            "user_id": test["user_id"].to_numpy(),
            "profile": [profiles.get(u, []) for u in test["user_id"]],
            "predict": [[i] for i in test["item_id"]],
        }
    ).sort_values("user_id")
    return RecData.from_frames(train, item_ids, holdout)


def _square(path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        box = ((im.width - side) // 2, (im.height - side) // 2, (im.width + side) // 2, (im.height + side) // 2)
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> DemoWorld:
    root = tmp_path_factory.mktemp("demo_small") / "demo"
    generate_demo_dataset(root, seed=7, n_items=400, n_users=150, target_interactions=6000, later_batches=0)
    rows = pd.read_csv(root / "interactions.csv").rename(columns={"timestamp": "ts"})
    items = pd.read_csv(root / "items.csv").sort_values("item_id")
    item_ids = items["item_id"].to_numpy(np.int64)
    data = _split(rows, item_ids)

    paths = [next((root / "images").glob(f"{i}.*")) for i in item_ids]
    images = _load_images(paths, IMAGE_SIZE)
    pooled, spatial = _resnet_features(images)

    creator = items["creator"].fillna("").astype(str)
    creators = np.where(creator.str.len() > 0, pd.Categorical(creator).codes, -1).astype(np.int64)
    centred = torch.from_numpy(pooled - pooled.mean(0))
    clusters = kmeans(centred / centred.norm(dim=1, keepdim=True), 8, seed=0).labels.astype(np.int64)
    fit, _ = data.validation_split()
    return DemoWorld(data, fit, images, pooled, spatial, creators, clusters, paths)


def _load_images(paths, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([_square(p, size) for p in paths])).permute(0, 3, 1, 2).contiguous()


def _resnet_features(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pooled ``[n, 2048]`` and spatial ``float16 [n, regions, 2048]`` random-init ResNet-50 features."""
    spec = get_backbone("resnet50")
    extractor = spec.feature_extractor(random_model(spec, seed=0))
    with torch.inference_mode():
        out = [extractor((images[s : s + 50].float() / 255.0 - _MEAN) / _STD) for s in range(0, len(images), 50)]
    pooled = torch.cat([o["pooled"].flatten(1) for o in out]).numpy()
    spatial = torch.cat([o["spatial"].flatten(2).transpose(1, 2) for o in out]).half().numpy()
    return pooled, spatial


@pytest.fixture(scope="module")
def baselines(world) -> dict[str, float]:
    out = {}
    models = (("random", RandomRecommender(RandomConfig())), ("most_popular", MostPopular(MostPopularConfig())))
    for name, model in models:
        model.fit(world.data, FitInputs())
        out[name] = _auc(model, world)
    return out


def _auc(model, world: DemoWorld) -> float:
    return float(evaluate(model.score, world.data.holdout, world.data.n_items, ks=()).means["auc"])


def _fit(model, world: DemoWorld, inputs: FitInputs | None = None):
    started = time.perf_counter()
    history = model.fit(world.fit, inputs or world.inputs())
    return history, time.perf_counter() - started


def _falls(loss: list[float]) -> bool:
    """Falls overall and never rises by more than a tenth of the first epoch's loss from one epoch to the next."""
    return loss[-1] < 0.9 * loss[0] and all(b < a + 0.1 * loss[0] for a, b in zip(loss, loss[1:]))


def test_dvbpr_loss_decreases_on_demo_data(world):
    # the demo preset at a smaller lr: its 1e-2 suits the demo's 1,500 items, not 4 batches an epoch
    model = DVBPR(DVBPRConfig.demo(train={"epochs": 4, "batch_size": 512, "lr": 3e-3, "device": "cpu"}, input_size=IMAGE_SIZE))
    history, _ = _fit(model, world, world.inputs(validation=False))
    assert len(history.loss) == 4 and _falls(history.loss), history.loss


def test_curatornet_with_guided_triples_loss_decreases_on_demo_data(world, baselines):
    fit = world.fit
    triples = build_guided_triples(
        fit.train, fit.train_ts, world.features, creators=world.creators, clusters=world.clusters
    )
    inputs = world.inputs(validation=False)
    inputs.extra["triples_guided"] = triples
    model = CuratorNet(CuratorNetConfig(train={"epochs": 4, "batch_size": 512, "device": "cpu"}))
    history, _ = _fit(model, world, inputs)
    assert len(history.loss) == 4 and _falls(history.loss), history.loss
    assert history.notes["sampler"]["total"] == len(triples)
    assert _auc(model, world) > baselines["random"] + 0.05


def test_acf_loss_decreases_on_demo_data(world):
    model = ACF(ACFConfig(train={"epochs": 4, "batch_size": 1024, "device": "cpu"}, dim=32, attention_dim=32, max_profile_len=10))
    history, _ = _fit(model, world, world.inputs(validation=False))
    assert len(history.loss) == 4 and _falls(history.loss), history.loss


def test_visrank_and_vbpr_beat_random_widely_and_vbpr_beats_most_popular(world, baselines):
    visrank = VisRank(VisRankConfig(device="cpu"))
    visrank.fit(world.data, world.inputs(validation=False))
    vbpr = VBPR(VBPRConfig(train={"epochs": 15, "device": "cpu"}))
    _fit(vbpr, world)
    auc_visrank, auc_vbpr = _auc(visrank, world), _auc(vbpr, world)
    summary = {"visrank": auc_visrank, "vbpr": auc_vbpr, **baselines}
    assert auc_visrank >= baselines["random"] + 0.15, summary
    assert auc_vbpr >= baselines["random"] + 0.15, summary
    assert auc_vbpr > baselines["most_popular"], summary


# A collapsed softmax puts (nearly) all weight on one option: normalised entropy ~0 (the pre-fix ACF:
# 0.01 over profile items, 0.10 over regions, the same region in every image). 0.5 means an effective
# number of options exp(H) of at least sqrt(n): 3 of 10 profile items, 4 of 16 regions.
SPREAD_ENTROPY = 0.5
# the most common highest-weight region may lead in at most half of the images (collapsed: all of them)
MAX_TOP_REGION_SHARE = 0.5


def test_acf_attentions_spread_and_follow_image_content(world):
    images = _load_images(world.image_paths, ACF_IMAGE_SIZE)
    _, spatial = _resnet_features(images)
    inputs = world.inputs()
    inputs.spatial = spatial
    train = {"epochs": 8, "batch_size": 1024, "device": "cpu"}
    model = ACF(ACFConfig(train=train))
    attention = _fit(model, world, inputs)[0].notes["attention"]
    # the settings before the fix: uncentred regions and no entropy term (and shuffled batches, as then)
    # collapse both softmaxes
    collapsed = ACF(
        ACFConfig(train=train, center_regions_by_position=False, item_attention_entropy_weight=0.0, user_chunk=1)
    )
    before = _fit(collapsed, world, inputs)[0].notes["attention"]

    assert spatial.shape[1] == 16 and attention["item_rows"] > 100, attention
    assert attention["item_entropy"] > SPREAD_ENTROPY and attention["item_max_share"] < 0.5, attention
    assert attention["component_entropy"] > SPREAD_ENTROPY, attention
    assert attention["component_top_region_share"] <= MAX_TOP_REGION_SHARE, attention
    # the test can tell: the old settings do collapse on the same data
    assert before["item_entropy"] < 0.2 and before["component_top_region_share"] > 0.8, before
    assert _auc(model, world) > _auc(collapsed, world)
