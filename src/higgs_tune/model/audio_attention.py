"""Audio-only self-attention per decoder layer (the original `use_audio_out_self_attention`).

Where it sits (read from boson-ai/higgs-audio `HiggsAudioDualFFNDecoderLayer.forward`): the
audio stream gets one extra pre-norm sub-layer *before* the shared self-attention:

    h_norm  = audio_input_layernorm(h)            (text: input_layernorm(h))
    h       = h + audio_attn(h_norm)               audio rows only; audio attends to earlier audio
    h_norm  = audio_post_audio_attn_layer_norm(h)  audio rows only; text rows keep h_norm
    h       = h + self_attn(h_norm)                shared text+audio attention, as before
    h       = h + audio_mlp(audio_post_attention_layernorm(h))   (text: mlp / post_attention_layernorm)

The module names are the original ones (`model.layers.N.audio_attn.{q,k,v,o}_proj`,
`model.layers.N.audio_post_audio_attn_layer_norm`), so state-dict keys are stable and an
original checkpoint trained with the block converts key for key.

Starting as an exact no-op on a checkpoint trained without it: q/k/v are copied from the
layer's `self_attn`, `o_proj` is zero (the block adds exactly 0), and the new norm copies
`audio_input_layernorm` (so the shared attention sees bit-identical inputs). At step 0 only
`o_proj` (and the norm) receive gradient; once `o_proj` moves, q/k/v train too.

Attention runs over the audio positions gathered per row (B, Na, H) with a causal mask in
gather order, using the full-sequence RoPE positions as the original does. During cached
generation the block keeps its own cache of audio keys/values, attached to the `Cache`
object the model passes down (so it lives and dies with one `generate` call).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.higgs_audio_v2.modeling_higgs_audio_v2 import (
    HiggsAudioV2DecoderLayer,
    HiggsAudioV2RMSNorm,
    apply_rotary_pos_emb,
    repeat_kv,
)

logger = logging.getLogger(__name__)

AUDIO_ATTN = "audio_attn"
AUDIO_ATTN_NORM = "audio_post_audio_attn_layer_norm"
# state-dict key fragments that belong to the block (used by the loader, LoRA and the report)
AUDIO_ATTN_KEY_PARTS = (f".{AUDIO_ATTN}.", f".{AUDIO_ATTN_NORM}.")

# Cache object -> {layer_idx: (keys (B, KVH, Nk, D), values (B, KVH, Nk, D), valid (B, Nk) bool)}.
# Weak keys: the audio cache disappears with the transformers Cache of that generate call.
_AUDIO_KV: weakref.WeakKeyDictionary[object, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


class HiggsTuneAudioSelfAttention(nn.Module):
    """Causal attention among the audio positions of each row; same shapes as the layer's self_attn."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        hidden_states: (B, Na, H) normed audio rows gathered per row, padded at the end.
        cos, sin: (B, Na, D) RoPE tables at those rows' sequence positions.
        past: keys/values/valid of earlier audio rows (cached generation) or None.
        valid: (B, Na) bool, False on padding slots.
        Returns the output (B, Na, H) and the new (keys, values, valid) including `past`.
        """
        b, na, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, na, -1, self.head_dim).transpose(1, 2)  # (B, NH, Na, D)
        k = self.k_proj(hidden_states).view(b, na, -1, self.head_dim).transpose(1, 2)  # (B, KVH, Na, D)
        v = self.v_proj(hidden_states).view(b, na, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        # New rows attend causally among themselves (padding sits at the end of a row, so a
        # real row never sees a padding slot; a padding row sees itself: no empty softmax).
        allowed = torch.ones(na, na, dtype=torch.bool, device=q.device).tril()[None, None].expand(b, 1, na, na)
        if past is not None:
            past_k, past_v, past_valid = past
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
            valid = torch.cat([past_valid, valid], dim=1)
            # every cached audio row precedes the new ones; padding slots of earlier calls are masked
            allowed = torch.cat([past_valid[:, None, None, :].expand(b, 1, na, -1), allowed], dim=-1)
        out = F.scaled_dot_product_attention(
            q,
            repeat_kv(k, self.num_key_value_groups),
            repeat_kv(v, self.num_key_value_groups),
            attn_mask=allowed,
            scale=self.scaling,
        )  # (B, NH, Na, D)
        out = out.transpose(1, 2).reshape(b, na, -1)
        return self.o_proj(out), (k, v, valid)


def _gather_audio_rows(mask: torch.Tensor | None, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence positions of each row's audio tokens, in order: idx (B, Na) long, valid (B, Na) bool.

    `mask` None means every position is audio (transformers' decode steps pass no text ids).
    """
    if mask is None:
        idx = torch.arange(length, device=device).expand(batch, length)
        return idx, torch.ones(batch, length, dtype=torch.bool, device=device)
    counts = mask.sum(dim=1)  # (B,)
    na = int(counts.max()) if batch else 0
    # stable sort puts the audio positions first, in sequence order
    idx = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :na]
    valid = torch.arange(na, device=device)[None, :] < counts[:, None]
    return idx, valid


class HiggsAudioV2DecoderLayerWithAudioAttention(HiggsAudioV2DecoderLayer):
    """HiggsAudioV2DecoderLayer + `audio_attn` / `audio_post_audio_attn_layer_norm` (see module doc).

    Instances are made by `enable_audio_self_attention` from loaded layers (class swap), so the
    existing weights and module names stay; `__init__` is the base one.
    """

    def _audio_self_attention(self, normed, mask, position_embeddings, cache) -> torch.Tensor:
        """Returns the block's output at the audio rows, shape (N_audio, H) in `normed[mask]` order."""
        b, length, hidden = normed.shape
        idx, valid = _gather_audio_rows(mask, b, length, normed.device)
        na = idx.shape[1]
        if na == 0:
            return normed.new_zeros(0, hidden)
        cos, sin = position_embeddings  # (1 or B, L, D)
        d = cos.shape[-1]
        gather_d = idx[..., None].expand(b, na, d)
        cos = cos.expand(b, -1, -1).gather(1, gather_d)
        sin = sin.expand(b, -1, -1).gather(1, gather_d)
        rows = normed.gather(1, idx[..., None].expand(b, na, hidden))  # (B, Na, H)

        layer_idx = self.audio_attn_layer_idx
        per_layer = _AUDIO_KV.setdefault(cache, {}) if cache is not None else None
        past = per_layer.get(layer_idx) if per_layer is not None else None
        out, present = self.audio_attn(rows, cos, sin, past=past, valid=valid)
        if per_layer is not None:
            per_layer[layer_idx] = tuple(t.detach() for t in present)
        return out[valid]  # (N_audio, H), row-major = the order of normed[mask]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None = None,
        audio_token_mask: torch.BoolTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        # hidden_states: (B, L, H); audio_token_mask: (B, L) bool, None = every position is audio
        residual = hidden_states
        mask = audio_token_mask
        if mask is None:
            normed = self.audio_input_layernorm(hidden_states)
        else:
            mask = mask.to(hidden_states.device)
            # identical ops to the base layer, so the no-op start is bit-exact
            normed = hidden_states.masked_scatter(mask.unsqueeze(-1), self.audio_input_layernorm(hidden_states[mask]))
            normed = normed.masked_scatter(~mask.unsqueeze(-1), self.input_layernorm(hidden_states[~mask]))

        # audio-only self-attention (its own residual branch), then its own pre-norm for the shared attention
        audio_out = self._audio_self_attention(normed, mask, position_embeddings, cache)
        if mask is None:
            residual = residual + audio_out.view_as(residual)
            normed = self.audio_post_audio_attn_layer_norm(residual)
        else:
            audio_residual = residual[mask] + audio_out  # (N_audio, H)
            residual = residual.masked_scatter(mask.unsqueeze(-1), audio_residual)
            normed = normed.masked_scatter(mask.unsqueeze(-1), self.audio_post_audio_attn_layer_norm(audio_residual))

        attn_out, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + attn_out

        # DualFFN, as in the base layer
        if mask is None:
            hidden_states = hidden_states + self.audio_mlp(self.audio_post_attention_layernorm(hidden_states))
        else:
            text_states = self.mlp(self.post_attention_layernorm(hidden_states[~mask]))
            audio_states = self.audio_mlp(self.audio_post_attention_layernorm(hidden_states[mask]))
            hidden_states[~mask] += text_states
            hidden_states[mask] += audio_states
        return hidden_states


def _decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a HiggsAudioV2ForConditionalGeneration or HiggsAudioV2Model."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(isinstance(m, HiggsAudioV2DecoderLayer) for m in layers):
        raise TypeError(
            f"expected a HiggsAudioV2ForConditionalGeneration (or HiggsAudioV2Model), got {type(model).__name__}; "
            "enable audio self-attention on the transformers model before wrapping it (PEFT, DDP)."
        )
    return layers


def has_audio_self_attention(model) -> bool:
    return any(isinstance(m, HiggsAudioV2DecoderLayerWithAudioAttention) for m in _decoder_layers(model))


def audio_attention_param_count(model) -> int:
    """Parameters of all added blocks (audio_attn + its norm), 0 when the blocks are absent."""
    total = 0
    for layer in _decoder_layers(model):
        if isinstance(layer, HiggsAudioV2DecoderLayerWithAudioAttention):
            total += sum(p.numel() for p in getattr(layer, AUDIO_ATTN).parameters())
            total += sum(p.numel() for p in getattr(layer, AUDIO_ATTN_NORM).parameters())
    return total


@torch.no_grad()
def enable_audio_self_attention(model) -> int:
    """Add the audio self-attention block to every decoder layer as an exact no-op; returns layers added.

    Layers that already have it are left alone (idempotent). Must run before PEFT wrapping.
    """
    layers = _decoder_layers(model)
    config = model.config
    added = 0
    for idx, layer in enumerate(layers):
        if isinstance(layer, HiggsAudioV2DecoderLayerWithAudioAttention):
            continue
        ref = layer.self_attn.q_proj.weight
        block = HiggsTuneAudioSelfAttention(config, layer_idx=idx).to(device=ref.device, dtype=ref.dtype)
        for name in ("q_proj", "k_proj", "v_proj"):
            src, dst = getattr(layer.self_attn, name), getattr(block, name)
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)
        block.o_proj.weight.zero_()
        if block.o_proj.bias is not None:
            block.o_proj.bias.zero_()
        norm = HiggsAudioV2RMSNorm(config.hidden_size, eps=layer.audio_input_layernorm.variance_epsilon)
        norm = norm.to(device=ref.device, dtype=layer.audio_input_layernorm.weight.dtype)
        norm.weight.copy_(layer.audio_input_layernorm.weight)

        layer.__class__ = HiggsAudioV2DecoderLayerWithAudioAttention
        layer.add_module(AUDIO_ATTN, block)
        layer.add_module(AUDIO_ATTN_NORM, norm)
        layer.audio_attn_layer_idx = idx
        added += 1
    if added:
        # FSDP auto-wrap (accelerate) looks layers up by the class names in `_no_split_modules`;
        # after the class swap no "HiggsAudioV2DecoderLayer" instance is left to find.
        for owner in (model, getattr(model, "model", None)):
            names = getattr(owner, "_no_split_modules", None)
            if names:
                owner._no_split_modules = [
                    HiggsAudioV2DecoderLayerWithAudioAttention.__name__ if n == HiggsAudioV2DecoderLayer.__name__ else n
                    for n in names
                ]
        per_layer = audio_attention_param_count(model) // len(layers)
        logger.info(
            "audio self-attention added to %d decoder layers: %s new parameters (%s per layer); "
            "initialised as an exact no-op (q/k/v from self_attn, o_proj = 0, norm from audio_input_layernorm)",
            added,
            f"{per_layer * added:,}",
            f"{per_layer:,}",
        )
    return added
