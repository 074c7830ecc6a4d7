"""The pipeline's stages, one module each (a stage imports none of the others), and the command line
that runs them (``python -m gsclip_lib.stages.cli``)."""
