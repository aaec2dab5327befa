"""Decoder-only transformer of the Llama family (Llama, Mistral, Qwen2, Qwen3).

A freshly built ``CausalLM`` mirrors the Hugging Face checkpoints (``named_parameters()``
are the safetensors tensor names); ``prepare`` then fuses q/k/v and gate/up into one
matmul each.  Every layer reads and writes the paged ``KVCache``.

``attention_backend`` (resolved by ``common.engine.kernels.backend``) picks the implementation once, at
build: ``torch`` runs each module's ``forward`` (plain PyTorch); ``triton`` runs their ``forward_fused``,
HF's residual stream carried as vLLM does (each layer returns its MLP output and the residual before it;
the next norm adds them in one fused kernel), rotary on the q/k views fused with the K/V cache write, paged
attention reading the KV blocks in place (on decode steps all three in one kernel), and SiLU*mul in one
kernel.  With ``decode_gemv`` a forward of at most ``gemv.DECODE_MAX_ROWS`` rows (a decode step of one
sequence) runs its projections as Triton GEMVs, the norms fused into the qkv and gate_up ones and SiLU*mul
into gate_up (``kernels.gemv``); larger ones keep cuBLAS.

Under tensor parallelism (``TensorParallel`` of N ranks) each rank's model holds its slice of
the checkpoint, as ``weight_shards`` says: q/k/v and gate/up column-parallel (its heads, its
part of the intermediate size), o_proj and down_proj row-parallel (summed over the ranks by
an all-reduce), the embedding and LM head vocab-parallel (its rows of the vocabulary); norms
are replicated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.engine.attention import AttentionMetadata, paged_attention, rotary_paged_attention_triton
from common.engine.kernels import activation, gemv, norm
from common.engine.kv_cache import KVCache
from common.engine.model_config import ModelConfig
from common.engine.parallel import SINGLE, Matmul, Shard, TensorParallel


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as HF: ``weight * normalized(x.float()).to(x.dtype)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Float32 inverse frequencies ``[head_dim // 2]`` (default, linear or llama3 scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths divided by `factor`, short kept, a smooth blend between
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of positions, rotate-half convention (HF), looked up in a table of every position.

    ``build_table`` fills ``table`` ``[max_positions, 2, head_dim]`` (cos, and sin with the
    sign of rotate-half folded into its first half) in the model dtype, computed in float32
    on the model's device exactly as HF does per step.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.max_positions = max_positions
        self.table: torch.Tensor | None = None

    def build_table(self, device: torch.device, dtype: torch.dtype) -> None:
        self.inv_freq = self.inv_freq.to(device)
        positions = torch.arange(self.max_positions, device=device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = freqs.shape[-1]
        sin = emb.sin().to(dtype)
        sin[:, :half].neg_()
        self.table = torch.stack((emb.cos().to(dtype), sin), dim=1)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """``[N, 2, head_dim]``: cos and signed sin of each position."""
        return self.table[positions]


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, heads, head_dim]``; ``cos_sin`` from ``RotaryEmbedding``.  Equals HF's
    ``x * cos + rotate_half(x) * sin``: ``rotate_half(x) * sin == roll(x, D/2) * signed_sin``."""
    cos, sin = cos_sin[:, None, 0], cos_sin[:, None, 1]
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


class Attention(nn.Module):
    """Checkpoint layout ``q_proj``/``k_proj``/``v_proj``; ``fuse`` merges them into one ``qkv_proj``.
    Holds this rank's query and KV heads (``TensorParallel.split``/``kv_heads``)."""

    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.num_heads = tp.split(config.num_heads)[1]
        self.num_kv_heads = tp.kv_heads(config.num_kv_heads)[1]
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = self.head_dim**-0.5
        self.layer_idx = layer_idx
        self.sliding_window = config.sliding_windows[layer_idx]

    def fuse(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
        n, heads = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(n, heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = apply_rope(qk, cos_sin)
        out = paged_attention(
            qk[:, :heads], qk[:, heads:], v, cache, self.layer_idx, meta, self.scale, self.sliding_window
        )
        return self.tp.row_linear(self.o_proj, out.reshape(n, self.q_size))

    def forward_fused(
        self, qkv: torch.Tensor, positions: torch.Tensor, rope_table: torch.Tensor, meta: AttentionMetadata,
        cache: KVCache, matmul: Matmul = F.linear,
    ) -> torch.Tensor:
        """``forward`` with the Triton kernels, from the qkv projection's output (the caller computes it, fused
        with the norm before it or not): q/k norms (Qwen3), then ``rotary_paged_attention_triton`` (rotary, the
        cache write of the rotated k and v, and attention: one fused kernel on decode steps), then o_proj
        computed by ``matmul`` (``F.linear``, or the decode GEMV)."""
        n, heads = qkv.shape[0], self.num_heads
        q = qkv[:, : self.q_size].view(n, heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = norm.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = norm.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        out = rotary_paged_attention_triton(
            q, k, v, positions, rope_table, cache, self.layer_idx, meta, self.scale, self.sliding_window
        )
        return self.tp.row_linear(self.o_proj, out.reshape(n, self.q_size), matmul)


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; ``fuse`` merges ``gate_proj``/``up_proj`` into ``gate_up_proj``.
    Holds this rank's part of the intermediate size."""

    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        hidden, inter = config.hidden_size, tp.split(config.intermediate_size)[1]
        self.gate_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inter, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=config.mlp_bias)
        self.intermediate_size = inter

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.tp.row_linear(self.down_proj, F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.row_linear(self.down_proj, activation.silu_and_mul(self.gate_up_proj(x)))

    def forward_gemv(
        self, x: torch.Tensor, residual: torch.Tensor, ln: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp(ln(x + residual)), x + residual)`` with the decode GEMVs: the norm and residual add fused
        into gate_up, SiLU*mul its epilogue, then down."""
        w = self.gate_up_proj
        act, residual = gemv.norm_gemv(x, residual, ln.weight, ln.eps, w.weight, w.bias, silu_mul=True)
        return self.tp.row_linear(self.down_proj, act, gemv.gemv), residual


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One ``nn.Linear`` computing ``cat([l(x) for l in linears], -1)`` (weights concatenated, the parts freed)."""
    weight = torch.cat([lin.weight for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if linears[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp: TensorParallel):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, meta, cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, rope_table: torch.Tensor,
        meta: AttentionMetadata, cache: KVCache, use_gemv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, residual)`` such that ``forward``'s output is ``residual + mlp_out``.  The input is
        ``residual + x`` (``residual`` None: ``x`` itself, the first layer).  ``use_gemv``: the projections run
        the decode GEMVs (``kernels.gemv``; at most ``gemv.DECODE_MAX_ROWS`` rows), norms fused into them, and the
        returned residual is a new tensor; else ``residual`` is updated in place."""
        attn, ln1, ln2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        if use_gemv:
            qkv, residual = gemv.norm_gemv(x, residual, ln1.weight, ln1.eps, attn.qkv_proj.weight, attn.qkv_proj.bias)
            h = attn.forward_fused(qkv, positions, rope_table, meta, cache, gemv.gemv)
            return self.mlp.forward_gemv(h, residual, ln2)
        if residual is None:
            residual, h = x, norm.rms_norm(x, ln1.weight, ln1.eps)
        else:
            h, residual = norm.fused_add_rms_norm(x, residual, ln1.weight, ln1.eps)
        h = attn.forward_fused(attn.qkv_proj(h), positions, rope_table, meta, cache)
        h, residual = norm.fused_add_rms_norm(h, residual, ln2.weight, ln2.eps)
        return self.mlp.forward_fused(h), residual


class Model(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(tp.vocab_rows(config.vocab_size)[1], config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_model_len
        )


class CausalLM(nn.Module):
    """``forward`` -> hidden states ``[N, hidden]``; ``compute_logits`` -> float32 logits.

    Built in the checkpoint's layout (``named_parameters()`` are the safetensors names);
    ``prepare`` (``load_model`` calls it) then fuses projections and builds the rope table,
    and only a prepared model runs ``forward``.  ``tp``: this rank's place in its tensor-parallel
    group (``SINGLE``: the whole model, no collectives).  ``attention_backend``: ``torch`` or ``triton``;
    ``decode_gemv`` (triton only): small batches' projections as Triton GEMVs (see the module docstring).
    """

    def __init__(
        self, config: ModelConfig, tp: TensorParallel = SINGLE, attention_backend: str = "torch",
        decode_gemv: bool = False,
    ):
        super().__init__()
        if attention_backend not in ("torch", "triton"):
            raise ValueError(f"CausalLM: attention_backend must be torch or triton, got {attention_backend!r}")
        if decode_gemv and attention_backend != "triton":
            raise ValueError("CausalLM: decode_gemv needs the triton attention backend")
        self.config = config
        self.tp = tp
        self.attention_backend = attention_backend
        self.decode_gemv = decode_gemv
        self.vocab_start = tp.vocab_rows(config.vocab_size)[0]
        self.model = Model(config, tp)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, tp.vocab_rows(config.vocab_size)[1], bias=False)
        self.prepared = False

    def weight_shards(self) -> dict[str, Shard]:
        """Checkpoint tensor name -> this rank's slice of it (absent: the rank holds the whole tensor)."""
        if self.tp.world_size == 1:
            return {}
        c, tp = self.config, self.tp
        q_start, q_size = (c.head_dim * n for n in tp.split(c.num_heads))
        kv_start, kv_size = (c.head_dim * n for n in tp.kv_heads(c.num_kv_heads))
        i_start, i_size = tp.split(c.intermediate_size)
        q = Shard(0, q_start, q_size, c.head_dim * c.num_heads)
        kv = Shard(0, kv_start, kv_size, c.head_dim * c.num_kv_heads)
        column = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv,
                  "mlp.gate_proj": Shard(0, i_start, i_size, c.intermediate_size),
                  "mlp.up_proj": Shard(0, i_start, i_size, c.intermediate_size)}  # fmt: skip
        row = {"self_attn.o_proj": Shard(1, q_start, q_size, q.full),
               "mlp.down_proj": Shard(1, i_start, i_size, c.intermediate_size)}  # fmt: skip
        vocab = Shard(0, *tp.vocab_rows(c.vocab_size), c.vocab_size)
        shards = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
        for i in range(c.num_layers):
            for module, shard in column.items():
                shards[f"model.layers.{i}.{module}.weight"] = shards[f"model.layers.{i}.{module}.bias"] = shard
            for module, shard in row.items():  # the bias of a row-parallel linear is replicated
                shards[f"model.layers.{i}.{module}.weight"] = shard
        return shards

    @torch.no_grad()
    def prepare(self) -> None:
        """Fuse q/k/v and gate/up weights (fewer, larger matmuls); build the rope table on the weights' device."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        embed = self.model.embed_tokens.weight
        self.model.rotary_emb.build_table(embed.device, embed.dtype)
        self.prepared = True

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """Compute ``input_ids`` ``[N]`` at ``positions`` ``[N]`` (flattened as ``meta`` says)."""
        if not self.prepared:
            raise RuntimeError("CausalLM.forward: call prepare() first (load_model does)")
        if kv_cache.num_layers != self.config.num_layers:
            raise ValueError(f"KV cache has {kv_cache.num_layers} layers, the model {self.config.num_layers}")
        x = self.tp.embed(self.model.embed_tokens, input_ids, self.vocab_start)
        if self.attention_backend == "triton":
            return self._forward_fused(x, positions, meta, kv_cache)
        cos_sin = self.model.rotary_emb(positions)
        for layer in self.model.layers:
            x = layer(x, cos_sin, meta, kv_cache)
        return self.model.norm(x)

    def _forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """``forward``'s layers and final norm with the Triton kernels (``DecoderLayer.forward_fused``)."""
        table = self.model.rotary_emb.table
        residual = None
        use_gemv = self.decode_gemv and x.shape[0] <= gemv.DECODE_MAX_ROWS
        for layer in self.model.layers:
            x, residual = layer.forward_fused(x, residual, positions, table, meta, kv_cache, use_gemv)
        final = self.model.norm
        return norm.fused_add_rms_norm(x, residual, final.weight, final.eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[M, vocab]`` of hidden rows ``[M, hidden]`` (under tensor parallelism every
        rank calls it: each computes its vocabulary rows, then they are gathered)."""
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        if self.tp.world_size == 1:
            return F.linear(hidden, weight).float()
        return self.tp.gather_vocab(F.linear(hidden, weight), self.config.vocab_size).float()
