"""Training: the joint objective, the LightningModule, EMA, optimisers, LoRA."""
