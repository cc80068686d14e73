"""The two Flamingo pieces that connect vision to language.

1. PerceiverResampler: turns each picture's patch tokens (257 -> 256 after dropping CLS) into a fixed set of
   64 latent vectors, so the language model always attends to the same small number of keys per picture.
2. GatedCrossAttentionBlock: inserted before some LLaMA layers; text tokens cross-attend to the latents of
   ONE picture, chosen by the media-masking rule (media_index), and the result is added through tanh gates
   that start at zero, so an untrained block leaves the language model exactly as it was.

Parameter names mirror OpenFlamingo's (`layers.{l}.0.to_kv`, `ff.1`, `attn_gate`, ...) so that its
checkpoint.pt loads without renaming. The math is the reference's, written with scaled_dot_product_attention
(the reference's explicit max-subtraction before softmax changes nothing numerically that matters).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Indices 0, 1, 3 carry weights: the checkpoint keys are ff.0 (LayerNorm), ff.1 and ff.3 (Linears).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., n, heads * d) -> (..., heads, n, d)"""
    *lead, n, hd = x.shape
    return x.view(*lead, n, heads, hd // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, n, d) -> (..., n, heads * d)"""
    *lead, h, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, h * d)


class PerceiverAttention(nn.Module):
    """Latents attend to [patches; latents]: the latents can also look at themselves."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, patches: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        patches, latents = self.norm_media(patches), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([patches, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int = 6, num_latents: int = 64, heads: int = 8, dim_head: int = 64,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (B, N, patches, dim) -> latents (B, N, num_latents, dim); each picture on its own."""
        latents = self.latents.expand(*patches.shape[:2], *self.latents.shape)
        for attn, ff in self.layers:
            latents = latents + attn(patches, latents)
            latents = latents + ff(latents)
        return self.norm(latents)


def media_index(input_ids: torch.Tensor, image_id: int, attend_previous: bool = False,
                images_before: int = 0) -> torch.Tensor:
    """Which picture (1-based; 0 = none) each token cross-attends to. (B, T) -> (B, T) long.

    c(t) = number of <image> tokens at positions <= t. Default rule (OpenFlamingo v1, what the released
    weights were trained with): an <image> token belongs to picture c(t), every other token to c(t) + 1, the
    picture that FOLLOWS it, and a number above the sequence's picture count means none. So text after the last
    picture sees no picture at all. attend_previous=True is the other rule: every token belongs to c(t).

    images_before lets a KV-cached continuation number its tokens as part of a longer sequence: that many
    pictures precede input_ids (and count towards the "exceeds" test).
    """
    is_image = input_ids == image_id
    count = is_image.cumsum(-1) + images_before
    if attend_previous:
        return count
    index = torch.where(is_image, count, count + 1)
    total = is_image.sum(-1, keepdim=True) + images_before
    return index.masked_fill(index > total, 0)


def make_picture_mask(index: torch.Tensor, n_latents: int, n_keys: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What every MaskedCrossAttention of a forward needs from media_index (B, T), made once: an additive mask
    (B, 1, T, n_keys) over the pictures' latents (n_latents per picture, one picture after the other), 0 on the
    latents of each token's picture and -inf elsewhere -- a token without a picture may attend anywhere (a fully
    masked row would be NaN) -- and has_image (B, 1, T, 1), which zeroes such a token's output: what the
    reference's masked_fill of the attention weights amounts to."""
    key_image = torch.arange(n_keys, device=index.device) // n_latents + 1
    has_image = (index > 0)[:, None, :, None]
    seen = (index[:, None, :, None] == key_image) | ~has_image
    mask = torch.zeros(seen.shape, dtype=dtype, device=index.device).masked_fill_(~seen, -float("inf"))
    return mask, has_image.to(dtype)


class MaskedCrossAttention(nn.Module):
    """Text queries, keys/values from the latents of the picture each token belongs to."""

    def __init__(self, dim: int, dim_visual: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def picture_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, N, n, dv) -> keys, values (B, heads, N * n, d): the pictures' latents one after the other.
        Computed once per picture when decoding. (Flattened after to_kv, not before: that would change the order in
        which autograd sums the blocks' gradients into the latents, and with it training's rounding.)"""
        k, v = self.to_kv(latents).flatten(1, 2).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], picture_mask) -> torch.Tensor:
        """x: (B * T, dim) (or (B, T, dim)); kv: picture_kv's; picture_mask: make_picture_mask's."""
        mask, has_image = picture_mask
        B, T = has_image.shape[0], has_image.shape[2]
        q = self.to_q(self.norm(x)).view(B, T, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask) * has_image
        return self.to_out(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, heads: int = 8, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, picture_mask) -> torch.Tensor:
        """kv None: no token of x sees a picture (their cross-attention output would be 0): only the FFW runs."""
        if kv is not None:
            x = x + self.attn(x, kv, picture_mask) * self.attn_gate.tanh()
        return x + self.ff(x) * self.ff_gate.tanh()
