"""Route prediction: trace format and importers, baseline and learned predictors, evaluation."""
