"""gsclip: vision-language alignment on 2D Gaussian splats (arXiv 2509.22615).

The subpackages follow the pipeline: ``splats`` (the representation), ``data`` (reading and writing
it), ``models``, ``training``, ``evaluation``, ``stages`` (one module per computing stage),
``reporting`` and ``pages`` (one module per notebook, drawing what the stages wrote). METHOD.md describes the method as implemented.
"""
