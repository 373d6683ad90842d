"""Training: weight maps, augmentation, losses and the training loop."""
