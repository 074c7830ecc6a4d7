"""Evaluation: zero-shot scoring, pixel baselines at matched bytes, the token budget."""
