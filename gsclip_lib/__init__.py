"""gsclip: vision-language alignment on 2D Gaussian splats (arXiv 2509.22615).

The subpackages follow the pipeline: ``splats`` (the representation), ``data`` (reading and writing
it), ``models``, ``training``, ``evaluation``, ``reporting``, and ``stages`` (one module per DVC
stage). METHOD.md describes the method as implemented.
"""
