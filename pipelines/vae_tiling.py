"""Tiled VAE encode / decode whose GroupNorm layers use the statistics of the WHOLE image, memory-flat in its size.

diffusers' ``vae.enable_tiling()`` runs each tile through the network alone: every GroupNorm normalises a tile with
that tile's own mean and variance, so neighbouring tiles get different colours and contrast, hidden by linear
blending. Here every GroupNorm of the encoder / decoder (the resnets', the mid-block attention's, ``conv_norm_out``)
normalises with per-sample, per-group statistics aggregated over all tiles, as the original SeeSR / OSEDiff tiled
VAE does, so tiles agree with the untiled network up to receptive-field cut-offs and the mid-block attention.

API (``vae`` is a diffusers :class:`~diffusers.AutoencoderKL`; both run under ``torch.no_grad``)::

    posterior = tiled_encode(vae, image, tile_size=512, overlap=64)   # image (B, 3, H, W) in [-1, 1]
    latents = posterior.sample(generator=generator)                   # or .mode(); unscaled, as vae.encode's
    images = tiled_decode(vae, latents, tile_size=64, overlap=11)     # latents unscaled (divided by scaling_factor)

``tiled_encode`` returns the ``DiagonalGaussianDistribution`` that ``vae.encode(image).latent_dist`` returns, so a
generator draws the same noise as untiled. Units are those of each function's input: image pixels for
``tiled_encode`` (``H`` and ``W`` must be multiples of the VAE's scale factor, 8), latent pixels for
``tiled_decode``. Inputs are cast to the VAE's dtype window by window (``unit_range=True`` also maps an image in [0, 1]
to [-1, 1] per window); outputs are in the VAE's dtype, like ``vae.encode/decode``.
Inputs no larger than ``tile_size`` on both sides run the stock forward unchanged.

How it works:

- **Tiles.** ``tile_size`` is the largest window the network ever sees (so peak activation memory is that of one
  ``tile_size`` image, whatever the image size). Each window is a *core* plus ``overlap`` of context on every side
  that has a neighbour; cores do not overlap and cover the image, so after cropping no blending is needed. With an
  overlap at least the network's receptive-field radius (:func:`receptive_radius`) a core's values are exactly
  those of the untiled network, given the same GroupNorm statistics; the defaults (64 image px for the encoder,
  the original's 11 latent px for the decoder; at most a quarter of the tile) are below the full radius of SD's
  VAE (108 px / 17.25 latent px) and trade a small difference at core borders for far fewer windows.
- **GroupNorm statistics.** A GroupNorm's statistics depend on every layer before it, and keeping every tile's
  activations (as the original does) would hold a full-size activation per layer. Instead, one pass over the
  windows per GroupNorm layer, in execution order, runs each window up to that layer (normalising the layers
  before it with their final statistics), accumulates the mean and variance of its input over the cores only
  (each pixel once; per channel with ``torch.var_mean``, merged in float64 with Chan's formula) and stops the
  forward there; a last pass normalises every layer with its statistics and writes the cores. The cost is about
  half the number of GroupNorm layers in full window passes (SD's decoder has 30 layers, its encoder 22); a first
  small forward on the image shrunk to one window records the layer order. ``exact=False`` is the original's
  fast mode: the statistics of that shrunk image only, then one pass (refining them iteratively by passes that
  normalise with the previous estimate does not converge reliably: errors grow through deep stacks).
- **Attention.** The mid-block self-attention is global in the untiled network; here, as in the original, it attends
  within each window (core plus overlap), with the aggregated GroupNorm statistics in front of it. Global attention
  would need keys and values of the whole image (2 x 512 channels per latent pixel for SD's VAE), which breaks the
  flat-memory goal. Without attention (``mid_block_add_attention=False``) and with a full-radius overlap, tiled and
  untiled agree to float rounding.
- **Memory.** Only one window's activations exist at a time; the full-size buffers are the input and the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from seesr.image_io import unit_float

#: Context margins: 64 image pixels for the encoder (the original: 32; at 512 px windows 64 needs no more windows up
#: to 2048 px and halves the receptive-field cut-off), 11 latent pixels for the decoder (as the original).
DEFAULT_ENCODER_OVERLAP = 64
DEFAULT_DECODER_OVERLAP = 11

Window = tuple[int, int, int, int]  # (top, bottom, left, right) in input pixels


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# Tile layout -----------------------------------------------------------------------------------------------------


def core_splits(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Cores covering ``[0, length)`` and their windows on one axis: ``(core_start, core_end, win_start, win_end)``.

    Windows are ``tile`` long (the whole axis when it is shorter) and contain their core widened by ``overlap``
    (clipped to the axis); all boundaries are multiples of ``align`` (``length``, ``tile`` and ``overlap`` must be
    too).
    """
    if length <= tile:
        return [(0, length, 0, length)]
    # Edge windows need context on one side only: with n windows the cores can cover 2 * overlap more than n
    # interior cores; the cores between the outer overlaps are spread evenly.
    units, margin, core_units = length // align, overlap // align, (tile - 2 * overlap) // align
    count = math.ceil((units - 2 * margin) / core_units)
    inner = [margin + i * (units - 2 * margin) // count for i in range(1, count)]
    bounds = [0, *(b * align for b in inner), length]
    # Every window is exactly ``tile`` long (edge windows get more context on their inner side): one activation
    # shape for all windows lets the allocator reuse the same blocks instead of fragmenting the heap.
    starts = [min(max(a - overlap, 0), length - tile) for a in bounds[:-1]]
    return [(a, b, s, s + tile) for a, b, s in zip(bounds, bounds[1:], starts, strict=False)]


def default_overlap(tile: int, preferred: int, align: int) -> int:
    """``preferred``, but at most a quarter of ``tile`` (so that half of a window is core), in ``align`` steps."""
    return min(preferred, tile // 4) // align * align


def _check_tiling(name: str, tile: int, overlap: int, align: int) -> None:
    if tile % align or overlap % align or overlap < 0:
        raise ValueError(f"{name}: tile size {tile} and overlap {overlap} must be non-negative multiples of {align}")
    if tile - 2 * overlap < align:
        raise ValueError(f"{name}: tile size {tile} leaves no core after an overlap of {overlap} on both sides")


def receptive_radius(module: nn.Module) -> float:
    """Receptive-field radius of a diffusers VAE ``Encoder`` / ``Decoder``, in its input's pixels.

    Counts the 3x3 convolutions (and the stride-2 down- / nearest-2x up-sampling convolutions) along the path; the
    mid-block attention is global and not counted. An overlap of at least this (rounded up) makes tiles exact.
    """
    radius, scale = 0.0, 1.0  # scale: size of one pixel of the current stage in input pixels

    def convs(m: nn.Module) -> None:
        nonlocal radius, scale
        for child in m.children():
            name = type(child).__name__
            if isinstance(child, nn.Conv2d):
                radius += (child.kernel_size[0] // 2) * child.dilation[0] * scale
                if child.stride[0] > 1:
                    scale *= child.stride[0]
            elif name == "Upsample2D":
                scale /= 2
                convs(child)
            elif name in ("Attention", "GroupNorm", "SiLU", "Dropout"):
                continue
            else:
                convs(child)

    for part in ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out"):
        child = getattr(module, part, None)
        if child is None:
            continue
        if isinstance(child, nn.Conv2d):
            radius += (child.kernel_size[0] // 2) * scale
        else:
            convs(child)
    return radius


# GroupNorm statistics ---------------------------------------------------------------------------------------------


class _Stats:
    """Running per-(sample, group) count / mean / M2 of one GroupNorm's input, merged in float64 (Chan et al.)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / self.count


class _StopForward(Exception):
    """Raised by the GroupNorm whose statistics a pass collects: nothing after it is needed in that pass."""


class GroupNormAggregator:
    """Context manager that re-routes every ``nn.GroupNorm`` under ``root`` to image-wide statistics.

    Modes, set by :meth:`start_pass`: ``"estimate"`` normalises each input with its own statistics (stock
    GroupNorm), records the order in which the layers run and accumulates every layer's statistics;
    ``"collect"`` normalises with the stored statistics up to the ``target`` layer, accumulates the statistics of
    its input's core region (set by :meth:`tile`) and stops the forward there; ``"apply"`` normalises every layer
    with the stored statistics.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.norms = [m for m in root.modules() if isinstance(m, nn.GroupNorm)]
        self.order: list[nn.GroupNorm] = []  # execution order, recorded by the "estimate" pass
        self.mode, self.target = "estimate", None
        self.window: Window = (0, 0, 0, 0)
        self.core: Window = (0, 0, 0, 0)
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._running: dict[int, _Stats] = {}
        self._prepared: dict[tuple, tuple] = {}  # normalisation parameters per (layer, batch, device)
        self._attention_hw: tuple[int, int] | None = None
        self._handles: list = []

    def __enter__(self) -> GroupNormAggregator:
        for norm in self.norms:
            norm.forward = self._forward_for(norm)  # instance attribute: shadows nn.GroupNorm.forward
        for module in self.root.modules():
            if any(getattr(module, "group_norm", None) is n for n in self.norms):  # diffusers Attention
                self._handles.append(module.register_forward_pre_hook(self._remember_hw))
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            vars(norm).pop("forward", None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # Passes ------------------------------------------------------------------------------------------------------

    def start_pass(self, mode: str, target: nn.GroupNorm | None = None) -> None:
        self.mode, self.target = mode, target
        if mode == "estimate":
            self.order = []
            self._running = {id(n): _Stats() for n in self.norms}
        elif mode == "collect":
            self._running = {id(target): _Stats()}

    def finish_pass(self) -> None:
        """Store the statistics accumulated since :meth:`start_pass`."""
        for key, stats in self._running.items():
            if stats.mean is None:
                raise RuntimeError("GroupNormAggregator: a GroupNorm layer saw no input in this pass")
            self.stored[key] = stats.mean_var()
        self._running, self._prepared = {}, {}

    def tile(self, window: Window, core: Window) -> None:
        """The window the next forward sees and its core (input pixels), whose statistics are collected."""
        self.window, self.core = window, core

    def run(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
        """``forward(x)``, or None when a "collect" pass stopped it at its target layer."""
        try:
            return forward(x)
        except _StopForward:
            return None

    # The replacement forward -------------------------------------------------------------------------------------

    def _remember_hw(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self._attention_hw = tuple(args[0].shape[-2:])

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (B, C, h, w): the attention's GroupNorm gets (B, C, h * w)."""
        if x.ndim == 4:
            return x
        if x.ndim == 3 and self._attention_hw is not None and math.prod(self._attention_hw) == x.shape[-1]:
            return x.unflatten(-1, self._attention_hw)
        raise RuntimeError(f"GroupNormAggregator: cannot locate the tile in a GroupNorm input of shape {x.shape}")

    def _core_of(self, x: torch.Tensor) -> torch.Tensor:
        x = self._spatial(x)
        (top, bottom, left, right), (c_top, c_bottom, c_left, c_right) = self.window, self.core
        height, width = x.shape[-2:]  # this stage's resolution: window size x 2^k (decoder) or / 2^k (encoder)
        rows = ((c_top - top) * height // (bottom - top), (c_bottom - top) * height // (bottom - top))
        cols = ((c_left - left) * width // (right - left), (c_right - left) * width // (right - left))
        return x[:, :, rows[0] : rows[1], cols[0] : cols[1]]

    def _accumulate(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        core = self._core_of(x)
        batch, channels = core.shape[:2]
        per_group = channels // norm.num_groups
        count = core.shape[-2] * core.shape[-1]
        # Per-channel statistics as reductions over the (strided) core view, then merged per group in float64.
        var, mean = torch.var_mean(core, dim=(-2, -1), correction=0)
        mean = mean.double().view(batch, norm.num_groups, per_group)
        m2 = var.double().view(batch, norm.num_groups, per_group) * count
        group_mean = mean.mean(-1)
        group_m2 = m2.sum(-1) + (mean - group_mean[..., None]).square().sum(-1) * count
        self._running[id(norm)].add(count * per_group, group_mean, group_m2)

    def _forward_for(self, norm: nn.GroupNorm) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.mode == "estimate":
                self.order.append(norm)
                self._accumulate(norm, x)
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            if norm is self.target:
                self._accumulate(norm, x)
                raise _StopForward
            return self._normalize_stored(norm, x)

        return forward

    def _normalize_stored(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        key = (id(norm), batch, x.device)
        if key not in self._prepared:
            mean, var = self.stored[id(norm)]
            if mean.shape[0] != batch:
                raise RuntimeError(f"GroupNormAggregator: statistics for batch {mean.shape[0]}, input batch {batch}")
            per_group = channels // norm.num_groups
            # Per-(sample, channel) float32 parameters for batch_norm over (1, B * C, ...): inference-mode batch_norm
            # applies given statistics in one native kernel (with float accumulation for half inputs).
            self._prepared[key] = (
                mean.repeat_interleave(per_group, dim=1).flatten().to(x.device, torch.float32),
                var.repeat_interleave(per_group, dim=1).flatten().to(x.device, torch.float32),
                norm.weight.float().repeat(batch) if norm.weight is not None else None,
                norm.bias.float().repeat(batch) if norm.bias is not None else None,
            )
        mean, var, weight, bias = self._prepared[key]
        flat = x.reshape(1, batch * channels, *x.shape[2:])
        return F.batch_norm(flat, mean, var, weight, bias, training=False, momentum=0.0, eps=norm.eps).view_as(x)


# The tiled runner ------------------------------------------------------------------------------------------------


def _downsampled(x: torch.Tensor, tile: int, align: int) -> torch.Tensor:
    """``x`` shrunk (area-averaged) so its longer side fits ``tile``, sides multiples of ``align`` (uint8 ``x``:
    as float value / 255)."""
    height, width = x.shape[-2:]
    factor = tile / max(height, width)
    size = tuple(max(align, int(side * factor) // align * align) for side in (height, width))
    if x.is_floating_point():
        return F.interpolate(x.float(), size=size, mode="area").to(x.dtype)
    # uint8: one channel at a time, so that no full-size float copy exists (area averaging is per channel)
    channels = [F.interpolate(unit_float(x[:, c : c + 1]), size=size, mode="area") for c in range(x.shape[1])]
    return torch.cat(channels, dim=1)


@torch.no_grad()
def _run_tiled(
    network: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    align: int,
    out_scale: float,
    exact: bool,
) -> torch.Tensor:
    height, width = x.shape[-2:]
    rows, cols = core_splits(height, tile, overlap, align), core_splits(width, tile, overlap, align)
    tiles = [((wt, wb, wl, wr), (ct, cb, cl, cr)) for ct, cb, wt, wb in rows for cl, cr, wl, wr in cols]

    def window_of(win: Window) -> torch.Tensor:
        return x[:, :, win[0] : win[1], win[2] : win[3]]

    with GroupNormAggregator(network) as norms:
        # Every layer's statistics on the image shrunk to one tile: the estimate of fast mode, and the layer order.
        small = _downsampled(x, tile, align)
        norms.start_pass("estimate")
        norms.tile((0, small.shape[-2], 0, small.shape[-1]), (0, small.shape[-2], 0, small.shape[-1]))
        forward(small)
        norms.finish_pass()
        del small
        if exact:  # one pass per GroupNorm, in execution order, each stopping at its layer
            if len(set(map(id, norms.order))) != len(norms.order):
                raise RuntimeError(
                    "tiled VAE: a GroupNorm layer runs twice in one forward; exact statistics need each to run once"
                )
            for target in norms.order:
                norms.start_pass("collect", target)
                for win, core in tiles:
                    norms.tile(win, core)
                    norms.run(forward, window_of(win))
                norms.finish_pass()
        norms.start_pass("apply")
        out = None
        for win, core in tiles:
            result = forward(window_of(win))
            if out is None:
                shape = (*result.shape[:2], round(height * out_scale), round(width * out_scale))
                out = torch.empty(shape, dtype=result.dtype, device=result.device)
            src = [round((c - w) * out_scale) for c, w in zip(core, (win[0], win[0], win[2], win[2]), strict=True)]
            dst = [round(c * out_scale) for c in core]
            out[:, :, dst[0] : dst[1], dst[2] : dst[3]] = result[:, :, src[0] : src[1], src[2] : src[3]]
            del result
    return out


def _offload_pre_forward(vae) -> None:
    """What diffusers' ``apply_forward_hook`` does for ``vae.encode`` / ``vae.decode``: let an accelerate hook
    (``enable_model_cpu_offload``) move the VAE to the execution device before we call its encoder / decoder."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def _prepare(vae, name: str, x: torch.Tensor, tile: int, overlap: int | None, preferred: int) -> int:
    """Check the input and the tiling of ``tiled_encode`` / ``tiled_decode`` (``name``), run an offload hook;
    returns the overlap (``preferred`` at most a quarter of the tile when None)."""
    encode = name == "tiled_encode"
    arg, channels = ("image", vae.config.in_channels) if encode else ("latents", vae.config.latent_channels)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: {arg}: expected a (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}")
    align = vae_scale_factor(vae) if encode else 1
    if x.shape[-2] % align or x.shape[-1] % align:
        raise ValueError(f"{name}: {arg} sides {tuple(x.shape[-2:])} must be multiples of {align}")
    overlap = default_overlap(tile, preferred, align) if overlap is None else overlap
    _check_tiling(name, tile, overlap, align)
    _offload_pre_forward(vae)
    return overlap


def tiled_encode(
    vae,
    image: torch.Tensor,
    tile_size: int = 512,
    overlap: int | None = None,
    exact: bool = True,
    unit_range: bool = False,
) -> DiagonalGaussianDistribution:
    """``vae.encode(image).latent_dist`` in ``tile_size``-pixel windows with image-wide GroupNorm statistics.

    ``image``: (B, C, H, W) in [-1, 1] (``unit_range=True``: in [0, 1], float or uint8 read as value / 255, mapped
    per window as ``x * 2 - 1`` in the VAE's dtype, which spares a full-size copy), H and W multiples of the VAE's
    scale factor; ``tile_size`` / ``overlap``: window side and context margin in image pixels (multiples of the scale
    factor; ``overlap=None``: 64, at most a quarter of the tile); ``exact=False``: fast mode (module docstring).
    """
    scale = vae_scale_factor(vae)
    overlap = _prepare(vae, "tiled_encode", image, tile_size, overlap, DEFAULT_ENCODER_OVERLAP)
    if image.dtype == torch.uint8 and not unit_range:
        raise ValueError("tiled_encode: a uint8 image is read as value / 255 and needs unit_range=True")

    def forward(x: torch.Tensor) -> torch.Tensor:
        # per window: no full-size copy (uint8 windows are read as value / 255, as ToTensor)
        x = unit_float(x, vae.dtype) * 2 - 1 if unit_range else x.to(vae.dtype)
        moments = vae.encoder(x)
        return vae.quant_conv(moments) if vae.quant_conv is not None else moments

    if max(image.shape[-2:]) <= tile_size:
        with torch.no_grad():
            return DiagonalGaussianDistribution(forward(image))
    moments = _run_tiled(vae.encoder, forward, image, tile_size, overlap, scale, 1 / scale, exact)
    return DiagonalGaussianDistribution(moments)


def tiled_decode(
    vae,
    latents: torch.Tensor,
    tile_size: int = 64,
    overlap: int | None = None,
    exact: bool = True,
) -> torch.Tensor:
    """``vae.decode(latents).sample`` in ``tile_size``-latent-pixel windows with image-wide GroupNorm statistics.

    ``latents``: (B, latent_channels, h, w), unscaled (already divided by ``scaling_factor``); ``tile_size`` /
    ``overlap``: window side and context margin in latent pixels (``overlap=None``: 11, at most a quarter of the
    tile); ``exact=False``: fast mode (see the module docstring). Returns (B, 3, h * 8, w * 8) in [-1, 1].
    """
    overlap = _prepare(vae, "tiled_decode", latents, tile_size, overlap, DEFAULT_DECODER_OVERLAP)

    def forward(z: torch.Tensor) -> torch.Tensor:
        z = z.to(vae.dtype)
        return vae.decoder(vae.post_quant_conv(z) if vae.post_quant_conv is not None else z)

    if max(latents.shape[-2:]) <= tile_size:
        with torch.no_grad():
            return forward(latents)
    return _run_tiled(vae.decoder, forward, latents, tile_size, overlap, 1, vae_scale_factor(vae), exact)
