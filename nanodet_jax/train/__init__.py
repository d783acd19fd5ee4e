"""Training: learning-rate schedule, optimizer, weight averaging (EMA) and the training loop."""
