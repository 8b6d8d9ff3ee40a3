"""The denoiser: a bidirectional transformer that predicts the tokens behind masks.

LLaDA's architecture at any size: token embedding, rotary positions, pre-norm RMSNorm blocks with
multi-head attention and a SiLU-gated MLP, no biases, an untied LM head, and no time input (the
best prediction at a masked position depends only on the visible tokens). Attention is full, not
causal: every position sees every real token. The model knows nothing of the loss or of training.
The same block also takes what the Llama/Qwen families add (grouped-query attention, q/k/v biases,
Qwen3's per-head q/k norms, a head width of its own, tied embeddings), so their checkpoints load as
they are; caches keep the key/value heads only, never repeated copies.

Shape legend:  B batch, L sequence length, D d_model, H heads, G key/value heads, K head dim,
V vocab, F MLP.

    model = Denoiser(ModelConfig(preset="tiny"))
    logits_BLV = model(input_ids_BL, attention_mask_BL)

For fast sampling the model can also return its keys/values (``prefill``) and then recompute only
a window of the canvas against them (``forward_window``): the bidirectional analogue of a KV cache
(``dlm_ray.core.kv_cache``, which holds the cache and the passes against it).
With ``attention: block_causal`` (block diffusion) a position sees every position of its own block
and of the blocks before it, never a later block; blocks are counted from ``block_start`` (0 in
training; the generation start when sampling, the prompt's blocks counted back from it). A
finished block's keys/values then never change, so ``forward_block`` denoises the next block
against a cache of everything before it, exactly, written in place; the pass that starts a block
also feeds the finished block before it, which joins the cache (``finished``). With
``attention: causal`` the same network is an autoregressive model (blocks of one position, logits
at i predicting token i + 1): the baseline the diffusion objectives are compared against.
Every entry point can return logits for a span of positions only (``logits_span``): a sampler
reads one block's, and at LLaDA's vocabulary (126,464) the whole canvas's float32 logits are
gigabytes per step. ``checkpointed`` (block indices) recomputes those blocks' activations in the
backward pass instead of keeping them (activation checkpointing), in training only.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dlm_ray.config.schema import ModelConfig, RopeScaling
from dlm_ray.core import kv_cache
from dlm_ray.core.embedding_input import NoiseInput, TokenEmbedding, denoise_embeddings
from dlm_ray.core.model_size import flops_per_token, num_params  # noqa: F401 - imported from here by callers
from dlm_ray.core.kv_cache import KVCache, LayerKV  # also imported from here by older code


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations do not lose the mean-square's precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rope_tables(pos_BL: torch.Tensor, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, L, K/2] for the given absolute positions (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos_BL.device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = pos_BL.float()[:, None, :, None] * inv_freq  # B,1,L,K/2
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rescaled rotary frequencies: long wavelengths slowed by ``factor``, short ones
    kept, the band between interpolated linearly in (original context / wavelength)."""
    wavelen = 2 * math.pi / inv_freq
    context = s.original_max_position_embeddings
    ratio = context / wavelen
    blend = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0.0, 1.0)
    # blend 0 (wavelength >= context / low_freq_factor): inv_freq / factor; blend 1: inv_freq.
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def apply_rope(x_BHLK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate pairs (first half, second half) of each head: the layout LLaDA's weights use.
    x1, x2 = x_BHLK.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BHLK.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        q_width, kv_width = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        self.q_proj = nn.Linear(cfg.d_model, q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(q_width, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_size, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_size, cfg.norm_eps)

    def forward(
        self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep_B11S: torch.Tensor | None,
        kv: LayerKV | None = None, start: int = 0, write: bool = False,
    ) -> tuple[torch.Tensor, LayerKV]:
        """Attention of L positions. Without ``kv`` they attend to each other (S = L). With ``kv``
        (keys/values of a whole canvas of S positions) the L positions are the window
        [start, start + L) of it: its keys/values are computed afresh, the rest come from ``kv``.
        With ``write`` the fresh keys/values are written into ``kv``'s slots [start, start + L)
        and the L positions attend to its slots up to there (S = start + L), nothing copied."""
        B, L, _ = x_BLD.shape
        q_BLHK = self.q_proj(x_BLD).view(B, L, self.n_heads, self.head_dim)
        k_BLGK = self.k_proj(x_BLD).view(B, L, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3: each head normalised before its rotation
            q_BLHK, k_BLGK = self.q_norm(q_BLHK), self.k_norm(k_BLGK)
        q_BHLK = apply_rope(q_BLHK.transpose(1, 2), cos, sin)
        # Keys are stored after RoPE: each carries its own absolute position.
        k_BGLK = apply_rope(k_BLGK.transpose(1, 2), cos, sin)
        v_BGLK = self.v_proj(x_BLD).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        k_BGSK, v_BGSK = k_BGLK, v_BGLK
        if kv is not None and write:
            kv[0][:, :, start:start + L] = k_BGLK
            kv[1][:, :, start:start + L] = v_BGLK
            k_BGSK, v_BGSK = kv[0][:, :, :start + L], kv[1][:, :, :start + L]
        elif kv is not None:
            k_BGSK = torch.cat([kv[0][:, :, :start], k_BGLK, kv[0][:, :, start + L:]], dim=2)
            v_BGSK = torch.cat([kv[1][:, :, :start], v_BGLK, kv[1][:, :, start + L:]], dim=2)
        # Each group of n_heads / n_kv query heads reads one key/value head, never a repeated copy.
        y_BHLK = F.scaled_dot_product_attention(q_BHLK, k_BGSK, v_BGSK, attn_mask=keep_B11S, is_causal=False,
                                                enable_gqa=self.n_kv != self.n_heads)
        return self.attn_out(y_BHLK.transpose(1, 2).reshape(B, L, -1)), (k_BGLK, v_BGLK)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ff_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.ff_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)  # down

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.ff_out(F.silu(self.ff_proj(x_BLD)) * self.up_proj(x_BLD))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_BLD, cos, sin, keep_B11S, kv=None, start=0, write=False):  # type: ignore[no-untyped-def]
        a_BLD, fresh = self.attn(self.attn_norm(x_BLD), cos, sin, keep_B11S, kv, start, write)
        x_BLD = x_BLD + a_BLD
        return x_BLD + self.mlp(self.ff_norm(x_BLD)), fresh


class Denoiser(nn.Module):
    """``model(input_ids_BL, attention_mask_BL=None) -> logits_BLV`` (float32)."""

    supports_logits_span = True  # samplers ask for one block's logits only

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.max_seq_len = cfg.max_seq_len
        self.checkpointed: frozenset[int] = frozenset()
        self.wte = TokenEmbedding(cfg.vocab_size, cfg.d_model)
        if cfg.noise == "gaussian":  # embedding diffusion: the noise level and self-conditioning come in too
            self.noise_in = NoiseInput(cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one matrix: named_parameters() lists it once, as wte.weight
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @classmethod
    def empty(cls, cfg: ModelConfig, *, device: str | torch.device, dtype: torch.dtype) -> Denoiser:
        """A model with uninitialised parameters allocated once, in ``dtype`` on ``device``: for
        weights about to be loaded (no fp32 copy, no time spent drawing random weights)."""
        with no_init(), torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype=dtype).to_empty(device=device)
        if cfg.tie_embeddings:  # to_empty gives each module a tensor of its own
            model.lm_head.weight = model.wte.weight
        return model

    def reset_parameters(self, params: Iterable[tuple[str, nn.Parameter]] | None = None) -> None:
        """Draw the initial weights: of every parameter, or of the (name, parameter) pairs given (one
        at a time, as an engine that partitions parameters across processes must)."""
        std = self.config.init_std
        for name, p in self.named_parameters() if params is None else params:
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                # Residual-branch outputs scaled down with depth (GPT-2) so deep presets start stable.
                residual_out = name.endswith(("attn_out.weight", "ff_out.weight"))
                scale = 1 / math.sqrt(2 * self.config.n_layers) if residual_out else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None, *,
        logits_span: tuple[int, int] | None = None, block_start: int = 0, clean_ids: torch.Tensor | None = None,
        visible_LL: torch.Tensor | None = None, block_size: int | None = None,
        noise_level: torch.Tensor | None = None, noise: torch.Tensor | None = None, latent: torch.Tensor | None = None,
        estimate: torch.Tensor | None = None, self_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, V], or [B, b - a, V] for positions [a, b) with ``logits_span=(a, b)``. With
        ``clean_ids`` (block-causal models, training): ``noisy_given_clean(input_ids, clean_ids)``.
        Training an adapted model only: ``visible_LL`` (bool, which keys each query sees besides
        itself) stands in for the attention pattern, ``block_size`` for the blocks of
        ``noisy_given_clean`` (``dlm_ray.core.adapt``'s schedules). With ``noise_level`` (embedding
        diffusion): ``denoise_embeddings``'s logits."""
        if clean_ids is not None:
            return self.noisy_given_clean(input_ids_BL, clean_ids, attention_mask_BL, block_size=block_size)
        if noise_level is not None:
            return self.denoise_embeddings(input_ids_BL, attention_mask_BL, noise_level, noise=noise, latent=latent,
                                           estimate=estimate, self_condition=self_condition, logits_span=logits_span)
        if hasattr(self, "noise_in"):
            raise ValueError("an embedding-diffusion model (model.noise: gaussian) reads noisy embeddings: pass "
                             "noise_level with noise (training) or latent (sampling)")
        logits_BLV, _ = self.prefill(input_ids_BL, attention_mask_BL, keep_cache=False, logits_span=logits_span,
                                     block_start=block_start, visible_LL=visible_LL)
        return logits_BLV

    def denoise_embeddings(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None, noise_level_BL: torch.Tensor, *,
        noise: torch.Tensor | None = None, latent: torch.Tensor | None = None, estimate: torch.Tensor | None = None,
        self_condition: torch.Tensor | None = None, logits_span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Embedding diffusion's call: logits of the clean tokens given z_t, each position at its
        noise level t (1: given, it reads its clean embedding e). z_t is t·e + (1 - t)·``noise``
        (training: the model mixes its own clean embeddings) or ``latent`` [B, L, D] (sampling).
        ``estimate`` [B, L, D] is a previous estimate ê (self-conditioning); ``self_condition``
        (bool [B], training) names the rows whose estimate the model first makes itself, from a pass
        without one that is not differentiated through."""
        return denoise_embeddings(self, input_ids_BL, attention_mask_BL, noise_level_BL, noise=noise, latent=latent,
                                  estimate=estimate, self_condition=self_condition, logits_span=logits_span)

    def run_inputs(self, x_BLD: torch.Tensor, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None,
                   logits_span: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits of the layers run on ``x_BLD`` (the first layer's input) at the ids' positions."""
        logits_BLV, _ = self.prefill(input_ids_BL, attention_mask_BL, keep_cache=False, logits_span=logits_span,
                                     inputs_BLD=x_BLD)
        return logits_BLV

    @property
    def block_causal(self) -> bool:
        return self.config.attention == "block_causal"

    @property
    def causal(self) -> bool:
        """An autoregressive model: position i sees positions <= i, and its logits predict i + 1."""
        return self.config.attention == "causal"

    @property
    def attention_block(self) -> int:
        """Positions per attention block of a block-causal or causal model (one for causal): a
        position sees its own block and the blocks before it."""
        return 1 if self.causal else self.config.block_size

    def prefill(
        self, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None, *, keep_cache: bool = True,
        logits_span: tuple[int, int] | None = None, block_start: int = 0, visible_LL: torch.Tensor | None = None,
        capacity: int | None = None, cached: int | None = None, inputs_BLD: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """The plain forward, also returning every layer's keys/values for ``forward_window`` (full
        attention) or ``forward_block`` (block-causal). With ``capacity`` (or ``cached``) the cache
        is allocated for that many slots (default L) and keeps the first ``cached`` positions
        (default all): a sampler's prompt, with the first block's logits from the same pass.
        ``inputs_BLD``: the first layer's input in place of the ids' embeddings (embedding diffusion)."""
        B, L = input_ids_BL.shape
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's context of {self.max_seq_len}")
        if attention_mask_BL is None:
            pos_BL = torch.arange(L, device=input_ids_BL.device).expand(B, L)
            keep_B11L = None
        else:
            real_BL = attention_mask_BL.bool()
            # Positions count real tokens only, so a left-padded row sees the same positions as the
            # same row unpadded: batched results then equal unbatched ones.
            pos_BL = (real_BL.long().cumsum(-1) - 1).clamp(min=0)
            keep_B11L = real_BL[:, None, None, :]
        attend = keep_B11L
        if self.block_causal or self.causal:
            attend = self._block_mask(L, block_start, keep_B11L, input_ids_BL.device)
        if visible_LL is not None:
            eye_LL = torch.eye(L, dtype=torch.bool, device=input_ids_BL.device)
            attend = (visible_LL if keep_B11L is None else visible_LL & keep_B11L) | eye_LL
        cos, sin = self._rope(pos_BL)
        x_BLD, layers = self._layers(self.wte(input_ids_BL) if inputs_BLD is None else inputs_BLD, cos, sin, attend,
                                     keep_cache)
        h_BLD = self.ln_f(x_BLD)
        a, b = logits_span or (0, L)
        logits_BLV = self.lm_head(self._head_input(h_BLD, a, b)).float()  # the head (L x V) only where read
        if not keep_cache:
            return logits_BLV, None
        hidden_BLD = h_BLD if self.config.shift_logits else None
        if capacity is None and cached is None:
            return logits_BLV, KVCache(layers, pos_BL, keep_B11L, hidden_BLD)
        return logits_BLV, KVCache.allocate(layers, pos_BL, keep_B11L, hidden_BLD, length=L if cached is None else cached,
                                            capacity=L if capacity is None else capacity)

    def _rope(self, pos_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(pos_BL, self.config.head_size, self.config.rope_theta, self.config.rope_scaling)

    def _head_input(self, h_BLD: torch.Tensor, a: int, b: int, before_BD: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states whose logits are those of positions [a, b) of ``h_BLD``: the same
        positions, or with ``shift_logits`` the ones before them; ``before_BD`` stands for the
        position before ``h_BLD``'s first (from a cache), else position 0 keeps its own."""
        if not self.config.shift_logits:
            return h_BLD[:, a:b]
        if a > 0:
            return h_BLD[:, a - 1:b - 1]
        first_B1D = h_BLD[:, :1] if before_BD is None else before_BD[:, None]
        return torch.cat([first_B1D, h_BLD[:, :b - 1]], 1)

    def _layers(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: torch.Tensor | None,
                keep_cache: bool) -> tuple[torch.Tensor, list[LayerKV]]:
        layers = []
        for i, block in enumerate(self.blocks):
            if self.training and i in self.checkpointed:
                x_BLD, fresh = torch.utils.checkpoint.checkpoint(block, x_BLD, cos, sin, attend, use_reentrant=False)
            else:
                x_BLD, fresh = block(x_BLD, cos, sin, attend)
            if keep_cache:
                layers.append(fresh)
        return x_BLD, layers

    def noisy_given_clean(self, noisy_BL: torch.Tensor, clean_BL: torch.Tensor,
                          attention_mask_BL: torch.Tensor | None = None, *, block_size: int | None = None) -> torch.Tensor:
        """Block diffusion's training forward (BD3-LM's vectorised form): the noisy row and the clean
        row side by side, [B, 2L]. A noisy block sees itself and the clean blocks before it; a clean
        block sees the clean blocks up to itself. One pass gives every noisy block's logits [B, L, V],
        each conditioned on exactly what sampling conditions it on."""
        B, L = noisy_BL.shape
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the model's context of {self.max_seq_len}")
        device = noisy_BL.device
        real_BL = torch.ones_like(noisy_BL, dtype=torch.bool) if attention_mask_BL is None else attention_mask_BL.bool()
        pos_BL = (real_BL.long().cumsum(-1) - 1).clamp(min=0)
        size = block_size or self.config.block_size
        blk = torch.div(torch.arange(L, device=device), size, rounding_mode="floor")
        blk2, clean2 = blk.repeat(2), torch.arange(2 * L, device=device) >= L
        q_blk, k_blk, q_clean, k_clean = blk2[:, None], blk2[None, :], clean2[:, None], clean2[None, :]
        attend_QK = ((~q_clean & ~k_clean & (q_blk == k_blk)) | (~q_clean & k_clean & (k_blk < q_blk))
                     | (q_clean & k_clean & (k_blk <= q_blk)))
        attend = (attend_QK[None, None] & real_BL.repeat(1, 2)[:, None, None, :]) | torch.eye(2 * L, dtype=torch.bool,
                                                                                             device=device)
        cos, sin = self._rope(pos_BL.repeat(1, 2))
        x_BSD, _ = self._layers(self.wte(torch.cat([noisy_BL, clean_BL], 1)), cos, sin, attend, False)
        if not self.config.shift_logits:
            return self.lm_head(self.ln_f(x_BSD[:, :L])).float()
        # Shifted: a block's first position reads the state before it as sampling does, from the
        # finished (clean) previous block; every other position reads its noisy neighbour.
        h_BSD = self.ln_f(x_BSD)
        first_L = (torch.arange(L, device=device) % size == 0) & (torch.arange(L, device=device) > 0)
        prev_noisy_BLD = self._head_input(h_BSD[:, :L], 0, L)
        prev_clean_BLD = self._head_input(h_BSD[:, L:], 0, L)
        return self.lm_head(torch.where(first_L[None, :, None], prev_clean_BLD, prev_noisy_BLD)).float()

    def _block_mask(self, L: int, block_start: int, keep_B11L: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
        """[B or 1, 1, L, L]: query q sees key k when k's block is not after q's and k is real (and
        always itself, so a padding query is never left with nothing to attend to). A causal model's
        blocks are single positions."""
        idx = torch.arange(L, device=device)
        size = 1 if self.causal else self.config.block_size
        blk = torch.div(idx - block_start, size, rounding_mode="floor")
        attend_LL = (blk[None, :] <= blk[:, None])[None, None]
        if keep_B11L is not None:
            attend_LL = attend_LL & keep_B11L
        return attend_LL | torch.eye(L, dtype=torch.bool, device=device)

    def forward_block(self, block_ids_BW: torch.Tensor, cache: KVCache, *, extend: bool = False,
                      logits_len: int | None = None, finished: int = 0) -> tuple[torch.Tensor, KVCache | None]:
        """Logits of a block that follows everything in ``cache`` (block-causal models; for a causal
        model, the next token: a block of one), written in place into the cache's room. With
        ``extend`` the block joins the cache; with ``finished`` the pass first feeds the finished
        block before it, which joins the cache (``kv_cache.forward_block``)."""
        return kv_cache.forward_block(self, block_ids_BW, cache, extend=extend, logits_len=logits_len,
                                      finished=finished)

    def forward_window(self, window_ids_BW: torch.Tensor, start: int, cache: KVCache, *,
                       logits_len: int | None = None) -> torch.Tensor:
        """Logits of the window [start, start + W) of the canvas ``cache`` was made from, against
        its (approximate) cached keys/values (``kv_cache.forward_window``)."""
        return kv_cache.forward_window(self, window_ids_BW, start, cache, logits_len=logits_len)


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """torch.nn.init's initialisers as no-ops while a model is built for weights about to be loaded
    (on the meta device, or partitioned at construction): there is nothing worth drawing, and drawing
    on meta tensors imports torch's compiler stack for nothing."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def compile_blocks(model: Denoiser) -> Denoiser:
    """``torch.compile`` each block in place: every entry point (forward, prefill, forward_window)
    runs the compiled blocks, and parameter names (checkpoints, exports) do not change."""
    for block in model.blocks:
        block.compile()
    return model
