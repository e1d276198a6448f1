from . import label_smoothed_cross_entropy_moe, sentence_prediction_moe  # noqa: F401  (registers the criteria)
