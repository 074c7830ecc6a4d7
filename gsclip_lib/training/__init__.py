"""Training: the loop, seeded epoch batches, the contrastive objectives and the alignment's stages."""
