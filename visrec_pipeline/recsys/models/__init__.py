"""Every recommender. Importing a model module registers it; this package imports them all, in the
order that orders the Dagster assets and the reports (so keep it, and keep import sorters off it).
Read the registry via :mod:`visrec_pipeline.recsys.registry`."""
# isort: skip_file

from visrec_pipeline.recsys.models import (  # noqa: F401  (imported to register, in this order)
    baselines,
    bpr_mf,
    ease,
    visrank,
    vbpr,
    dvbpr,
    curatornet,
    acf,
)
