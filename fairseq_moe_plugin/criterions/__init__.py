from . import (  # noqa: F401  (registers the criteria)
    label_smoothed_cross_entropy_distill,
    label_smoothed_cross_entropy_moe,
    sentence_prediction_moe,
)
