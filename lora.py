"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W x + (B A x) * alpha / r.

B starts at zero, so a freshly injected model computes exactly what it did before. `inject` swaps matching
nn.Linear modules in place (matching by module-name suffix, as peft 0.3 did for MultiModal-GPT), `merge` folds
the update into W for fast inference and `unmerge` takes it out again.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# MultiModal-GPT's release: LLaMA self-attention, the cross-attention projections and the cross-attention FFW.
# LLaMA's own MLP (gate/up/down_proj) is not adapted.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out", "ff.1", "ff.3")


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`, so checkpoints keep their names) with lora_A (r, in) and lora_B (out, r)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.init_lora(device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def wrap(cls, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Adopt base's frozen weight (no copy) and add fresh A, B."""
        lora = cls(base.in_features, base.out_features, r, alpha, dropout, bias=base.bias is not None,
                   device="meta", dtype=base.weight.dtype)
        lora.weight, lora.bias = base.weight, base.bias
        lora.weight.requires_grad_(False)
        lora.init_lora(base.weight.device)
        return lora

    def init_lora(self, device=None):
        # LoRA weights live in fp32 even when the frozen weight is bf16: their updates are small.
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (h * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


def matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS,
           within: str = "") -> list[str]:
    """Replace every nn.Linear under `within` whose name ends with a target by a LoRALinear; return the names."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n.startswith(within) and matches(n, targets)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.wrap(getattr(parent, child), r, alpha, dropout))
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of the model")
    return names


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module):
    for m in lora_layers(model):
        m.merge()


def unmerge(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA A/B tensors, under the model's own parameter names (`...q_proj.lora_A`)."""
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
