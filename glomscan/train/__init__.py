"""Training: dataset preparation, the segmentation U-Net, evaluation (and, later, inpainting)."""
