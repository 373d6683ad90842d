"""Networks: the custom U-Net, the segmentation-models-pytorch adapter, and checkpoints."""
