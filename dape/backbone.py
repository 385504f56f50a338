"""DAPE's two networks: the Swin image encoder and the RAM tagging head.

Both reproduce the numerics of RAM as SeeSR uses it (``ram/models/swin_transformer_lora.py`` and the
``mode='tagging'`` path of ``ram/models/bert_lora.py``), written here on plain ``torch.nn``:

- Swin (Liu et al. 2021): patch embedding + LayerNorm, stages of window attention with a learned relative
  position bias, every second block shifted by ``window_size // 2`` with the -100 attention mask, patch merging
  of the neighbours in the order (0,0), (1,0), (0,1), (1,1), a final LayerNorm, and the output
  ``[mean over tokens, tokens]``. A stage whose resolution is not larger than the window uses one unshifted
  window covering the whole map (as the original does).
- The tagging head: learned label embeddings -> Linear + ReLU as queries, then layers of BERT-style
  cross-attention (no self-attention) + feed-forward, each with a post-LayerNorm (eps 1e-12), then
  Linear(hidden -> 1).

q, k and v are separate ``nn.Linear`` modules (the original fuses them in one ``qkv``) so that PEFT can put LoRA on
the query and value projections by name; ``dape.convert`` splits the fused released weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SWIN_LAYER_NORM_EPS = 1e-5
TAGGING_LAYER_NORM_EPS = 1e-12
ATTENTION_MASK_VALUE = -100.0


def stage_geometry(
    image_size: int, patch_size: int, depths: tuple[int, ...], window_size: int
) -> list[tuple[int, int]]:
    """(feature-map side, effective window) of each stage, validated.

    Like the original, a stage whose side is not larger than ``window_size`` attends over the whole map in one
    unshifted window.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    side = image_size // patch_size
    geometry = []
    for index in range(len(depths)):
        window = min(window_size, side)
        if side % window:
            raise ValueError(
                f"stage {index} has a {side}x{side} feature map that window_size={window_size} does not tile; "
                "choose image_size, patch_size and window_size so that every stage is a multiple of the window"
            )
        geometry.append((side, window))
        if index < len(depths) - 1:
            if side % 2:
                raise ValueError(f"stage {index} has an odd {side}x{side} feature map that patch merging cannot halve")
            side //= 2
    return geometry


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2·window − 1)² relative-position-bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B · num_windows, window², C), windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B · num_windows, window², C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """(num_windows, window², window²) additive mask: 0 within a region of the rolled map, -100 across regions."""
    regions = torch.zeros(1, side, side, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        regions[:, rows, cols, :] = label
    labels = window_partition(regions, window).squeeze(-1)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape).masked_fill(different, ATTENTION_MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth per sample (active in training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B · num_windows, N, C); mask: (num_windows, N, N) or None."""
        windows, tokens, channels = x.shape
        query = self._heads(self.query(x)) * self.scale
        attn = query @ self._heads(self.key(x)).transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(windows // num_windows, num_windows, self.num_heads, tokens, tokens)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(windows, self.num_heads, tokens, tokens)
        out = attn.softmax(dim=-1) @ self._heads(self.value(x))
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, channels))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each with a residual."""

    def __init__(
        self, dim: int, num_heads: int, side: int, window: int, shift: int, mlp_ratio: float, drop_path: float
    ):
        super().__init__()
        self.side, self.window, self.shift = side, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=SWIN_LAYER_NORM_EPS)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=SWIN_LAYER_NORM_EPS)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        mask = shifted_window_mask(side, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        h = self.norm1(x).view(batch, self.side, self.side, channels)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, self.window), mask=self.attn_mask)
        h = window_reverse(h, self.window, self.side, self.side)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(h.reshape(batch, length, channels))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim: int, side: int) -> None:
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * dim, eps=SWIN_LAYER_NORM_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, self.side, self.side, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * channels)))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        side: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_paths: list[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, side, window, 0 if i % 2 == 0 else shift, mlp_ratio, drop_paths[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, side) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=SWIN_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinEncoder(nn.Module):
    """Swin image encoder: (B, C, S, S) -> (B, 1 + tokens, width), the first token the mean of the others."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int,
        mlp_ratio: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths={list(depths)} and num_heads={list(num_heads)} must have the same length")
        geometry = stage_geometry(image_size, patch_size, depths, window_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        self.layers = nn.ModuleList()
        for index, ((side, window), depth, heads) in enumerate(zip(geometry, depths, num_heads)):
            shift = window_size // 2 if side > window_size else 0
            start = sum(depths[:index])
            self.layers.append(
                SwinStage(
                    embed_dim * 2**index,
                    depth,
                    heads,
                    side,
                    window,
                    shift,
                    mlp_ratio,
                    rates[start : start + depth],
                    downsample=index < len(depths) - 1,
                )
            )
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=SWIN_LAYER_NORM_EPS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


class TaggingLayer(nn.Module):
    """BERT cross-attention (queries = labels, keys/values = image tokens) + feed-forward, post-LayerNorm."""

    def __init__(self, hidden_size: int, encoder_dim: int, num_heads: int, intermediate_size: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"tagging_hidden_size={hidden_size} is not divisible by tagging_num_heads={num_heads}")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(encoder_dim, hidden_size)
        self.value = nn.Linear(encoder_dim, hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=TAGGING_LAYER_NORM_EPS)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=TAGGING_LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        query = self._heads(self.query(hidden_states))
        key = self._heads(self.key(encoder_hidden_states))
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
        probs = self.dropout(scores.softmax(dim=-1))
        context = (probs @ self._heads(self.value(encoder_hidden_states))).transpose(1, 2).flatten(2)
        attended = self.attn_norm(self.dropout(self.attn_out(context)) + hidden_states)
        hidden = self.ffn_out(F.gelu(self.ffn_in(attended)))
        return self.ffn_norm(self.dropout(hidden) + attended)


class TaggingHead(nn.Module):
    """(B, tokens, encoder_dim) image embeddings -> (B, num_classes) tag logits."""

    def __init__(
        self,
        num_classes: int,
        encoder_dim: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.label_embed = nn.Parameter(torch.zeros(num_classes, encoder_dim))
        nn.init.normal_(self.label_embed, std=0.02)
        self.wordvec_proj = nn.Linear(encoder_dim, hidden_size)
        self.layers = nn.ModuleList(
            TaggingLayer(hidden_size, encoder_dim, num_heads, intermediate_size, dropout) for _ in range(num_layers)
        )
        self.fc = nn.Linear(hidden_size, 1)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        queries = F.relu(self.wordvec_proj(self.label_embed))
        hidden = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        for layer in self.layers:
            hidden = layer(hidden, image_embeds)
        return self.fc(hidden).squeeze(-1)
