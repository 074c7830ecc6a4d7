"""The pipeline's stages (one module each), their runner, the command line and the DVC helpers."""
