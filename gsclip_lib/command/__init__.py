"""The ``gsclip`` command: encode images to splat bytes, look at them, classify them from the bytes.

:mod:`gsclip_lib.command.main` parses the command line and prints; the work is :mod:`gsclip_lib.api`'s.
One module per group of subcommands: :mod:`~gsclip_lib.command.encoding` (``encode``),
:mod:`~gsclip_lib.command.viewing` (``render``, ``info``, ``compare``) and
:mod:`~gsclip_lib.command.classifying` (``classify``).
"""
