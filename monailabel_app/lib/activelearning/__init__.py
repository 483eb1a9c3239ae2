"""Active learning: the model's own uncertainty ranks the unlabelled images."""
