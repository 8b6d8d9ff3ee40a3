"""Measuring models: held-out scoring on the built-in corpus, the objective comparison, and the
lm-evaluation-harness adapter."""
