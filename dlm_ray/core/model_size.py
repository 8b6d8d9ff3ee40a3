"""A model's size without building it: its exact parameter count and its training FLOPs per token
(the MFU figure's numerator), from its ``ModelConfig`` alone."""

from __future__ import annotations

from dlm_ray.config.schema import ModelConfig


def num_params(cfg: ModelConfig, *, include_embedding: bool = True) -> int:
    """Exact parameter count of ``Denoiser(cfg)``, computed without building it."""
    D, F_, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    attention = 2 * D * q + 2 * D * kv + ((q + 2 * kv) if cfg.qkv_bias else 0) + (2 * cfg.head_size if cfg.qk_norm else 0)
    per_block = attention + 3 * D * F_ + 2 * D
    # Blocks, final norm, an untied LM head; a tied head is the embedding's matrix, counted once.
    n = cfg.n_layers * per_block + D + (0 if cfg.tie_embeddings else V * D)
    if cfg.noise == "gaussian":  # the noise level's two-layer embedding and the self-conditioning projection
        n += 3 * D * D + 2 * D
    return n + (V * D if include_embedding else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N for the matmuls plus full attention.

    N excludes the embedding lookup (no matmul). Attention is bidirectional, so every query attends
    to all ``seq_len`` keys: 12 * layers * d_model * seq_len (no causal halving).
    """
    n = num_params(cfg, include_embedding=False) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
