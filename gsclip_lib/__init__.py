"""gsclip: vision-language alignment on 2D Gaussian splats (arXiv 2509.22615)."""
