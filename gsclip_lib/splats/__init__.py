"""The splat representation: container, render, initialization, fitting, pruning, codec, quality."""
