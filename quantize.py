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


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the decoder's linear layers and lm_head by Int8Linear, in place (LoRA merged first). Returns model."""
    lora.merge(model)
    for name, m in [(n, m) for n, m in model.named_modules() if n.startswith(("layers.", "lm_head"))]:
        if isinstance(m, (nn.Linear, lora.LoRALinear)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Int8Linear(m.weight, m.bias))
    return model
