"""The backbone whose features the models train on and the visual clusters are computed from."""

FEATURE_BACKBONE = "resnet50"
