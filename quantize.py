"""Weight-only int8 for decoding (chat.py / eval.py --int8): the decoder's frozen linear weights stored as int8 with
one scale per output row, and turned back into the activations' dtype inside each matmul.

Why: decoding one token reads every weight once, so its speed is the bytes read. int8 halves bf16's 15.5 GB for
LLaMA-7B + the cross-attention blocks (with the ViT, perceiver and embeddings in bf16, about 9 GB in all: a 12 GB
card). Compiled (chat.py's fast path), inductor can fuse the int8 -> bf16 conversion into the matmul's loads, so
the weights cross the memory bus as int8; eager, the conversion is a separate kernel and reads them twice.

What is quantized: every linear layer of the decoder (self-attention, MLP, the gated cross-attention blocks) and
lm_head, after LoRA is merged into them (chat never trains). The ViT and the perceiver run once per picture and
stay as they are; so do the embeddings and norms. Symmetric per-row scales: row i of W becomes
round(W_i / s_i) with s_i = max|W_i| / 127, so every weight is off by at most s_i / 2.
"""
import torch
import torch.nn.functional as F
from torch import nn

import lora


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scales (+ bias): q int8 (out, in), scales (out,) in the original weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127      # an all-zero row stays zero, not NaN
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias), W stored as 4-bit codes per group of `group_size` inputs: W = (q - 8) * scale."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"int4: {in_features} inputs are not a multiple of the group size {group_size}")
        w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        scales = w.abs().amax(dim=2).clamp(min=1e-12) / 7
        q = (torch.round(w / scales[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(out_features, -1)
        self.register_buffer("weight", q[:, 0::2] | (q[:, 1::2] << 4))     # two codes a byte
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    def dequantized(self, dtype) -> torch.Tensor:
        q = torch.stack([self.weight & 15, self.weight >> 4], dim=-1).reshape(self.out_features, -1, self.group_size)
        return ((q.to(dtype) - 8) * self.scales.to(dtype)[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


MODES = ("int8", "int4")


def is_quantized(name: str) -> bool:
    """Which linear layers are quantized, by module name: the decoder's and lm_head."""
    return name.startswith(("layers.", "lm_head"))


def linear_bytes(out_features: int, in_features: int, mode: str, group_size: int = 128, scale_bytes: int = 2) -> int:
    """Bytes a quantized linear layer's weight holds (codes + scales), for sizing memory before loading."""
    if mode == "int8":
        return out_features * (in_features + scale_bytes)
    return out_features * (in_features // 2 + in_features // group_size * scale_bytes)


def quantize_linear(linear: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """The quantized replacement of one materialized linear layer (its weight in bf16/fp16/fp32, LoRA merged)."""
    if mode == "int8":
        return Int8Linear(linear.weight, linear.bias)
    if mode == "int4":
        return Int4Linear(linear.weight, linear.bias, group_size)
    raise ValueError(f"quantization {mode!r}: one of {MODES}")


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 128) -> nn.Module:
    """Replace the decoder's linear layers and lm_head by quantized ones, in place (LoRA merged first)."""
    lora.merge(model)
    for name, m in [(n, m) for n, m in model.named_modules() if is_quantized(n)]:
        if isinstance(m, (nn.Linear, lora.LoRALinear)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, quantize_linear(m, mode, group_size))
    return model
