"""The Dagster layer, loaded by folder (``dg.load_from_defs_folder`` in ``visrec_pipeline/definitions.py``).

Each module here is one domain and exposes one ``defs`` (a ``dg.Definitions``, or for the resources
a ``@dg.definitions`` function); the folder loader takes that object and nothing else from the module.
Helper modules (``automation.py``, ``config_bridge.py``) define no Dagster objects, so they add nothing.
"""
