"""Training: the trainer's models, the optimizer loop, the loss family, log-probs, packing, LoRA and
data parallelism."""
