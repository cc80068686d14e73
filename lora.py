"""LoRA: a frozen linear layer plus a trainable low-rank update, y = W x + (B A x) * alpha / r.

B starts at zero, so a freshly injected model computes exactly what it did before. `inject` swaps matching
linear layers in place (matching by module-name suffix, as peft 0.3 did for MultiModal-GPT), `merge` folds
the update into W for fast inference and `unmerge` takes it out again.

Fused projections: the model computes q/k/v (and gate/up) with one linear layer whose rows are the parts side
by side; such a layer has `parts` = the parts' names ("q_proj", "k_proj", "v_proj"). LoRA targets and files
still name the parts (`self_attn.q_proj.lora_A`), so a fused layer adapts only the parts a target names, each
with its own A and B, and `file_tensors` gives every parameter under the names the files use.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# MultiModal-GPT's release: LLaMA self-attention, the cross-attention projections and the cross-attention FFW.
# LLaMA's own MLP (gate/up/down_proj) is not adapted.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out", "ff.1", "ff.3")


class LoRALinear(nn.Module):
    """A linear layer's frozen weight (adopted, same name, so checkpoints keep their names) + lora_A, lora_B.

    Plain layer: lora_A (r, in), lora_B (out, r). Fused layer (n parts of out/n rows, k of them adapted):
    lora_A stacks the adapted parts' A's (k*r, in); lora_B (out, k*r) is block-diagonal -- part i's rows times
    its A's columns -- kept dense and multiplied by a fixed 0/1 `mask`, so that all parts take one matmul, the
    other blocks get zero gradient, and the rows of parts not adapted stay exactly W x.

    A and B are held in `dtype` (default: the frozen weight's), so a bf16 model runs LoRA in bf16 with no casts;
    an optimizer may keep fp32 master copies. If they differ from the activations' dtype they are cast per call.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, adapted=None, dtype=None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias    # no copy
        self.weight.requires_grad_(False)
        self.parts = getattr(base, "parts", None)
        self.adapted = tuple(adapted or self.parts or ())
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        out_features, in_features = self.weight.shape
        k = max(len(self.adapted), 1)
        device, dtype = self.weight.device, dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(k * r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, k * r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.parts is None:
            self.mask = None
        else:
            mask = torch.zeros(out_features, k * r, device=device, dtype=dtype)
            for j, (rows, _) in enumerate(self.blocks()):
                mask[rows, j * r:(j + 1) * r] = 1
            self.register_buffer("mask", mask, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def blocks(self):
        """(row slice, part name) of each adapted part of a fused layer, in the order of lora_A's blocks."""
        size = self.weight.shape[0] // len(self.parts)
        return [(slice(i * size, (i + 1) * size), p) for i, p in enumerate(self.parts) if p in self.adapted]

    def lora_b(self) -> torch.Tensor:
        return self.lora_B if self.mask is None else self.lora_B * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        A, B = self.lora_A, self.lora_b()
        if A.dtype != y.dtype:  # LoRA held in another precision than the activations (load() keeps it in fp32)
            A, B = A.to(y.dtype), B.to(y.dtype)
        h = F.linear(self.dropout(x), A)
        # y + scale * h B^T as one addmm (one kernel instead of mm, mul, add)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), B.t(), alpha=self.scale).view(y.shape)

    def delta(self) -> torch.Tensor:
        return (self.lora_b() @ self.lora_A) * self.scale

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


def part_name(module_name: str, part: str) -> str:
    """`layers.0.self_attn.qkv_proj`, `q_proj` -> `layers.0.self_attn.q_proj`: the name files give a part."""
    parent = module_name.rpartition(".")[0]
    return f"{parent}.{part}" if parent else part


def inject(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0, targets=DEFAULT_TARGETS,
           within: str = "", dtype=None) -> list[str]:
    """Give every linear layer under `within` whose name ends with a target a LoRA update (on a fused layer: the
    parts whose names do); return the adapted names (parts by their own names). dtype: of A and B (default:
    each frozen weight's)."""
    names = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or not name.startswith(within):
            continue
        parts = getattr(m, "parts", None)
        adapted = [p for p in parts if matches(part_name(name, p), targets)] if parts else None
        if parts and not adapted or not parts and not matches(name, targets):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(m, r, alpha, dropout, adapted, dtype))
        names += [part_name(name, p) for p in adapted] if parts else [name]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of the model")
    return names


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def adapted_names(model: nn.Module) -> list[str]:
    """What inject() returned: the adapted layers, parts of fused layers by their own names."""
    return [part_name(n, p) if m.parts else n for n, m in model.named_modules() if isinstance(m, LoRALinear)
            for p in (m.adapted or [None])]


def targets_of(model: nn.Module) -> list[str]:
    """The adapted layers under `layers.N.` as suffixes ("self_attn.q_proj", "xattn.ff.1"): the targets with which
    inject(within="layers.") rebuilds exactly this set."""
    return sorted({re.sub(r"^layers\.\d+\.", "", n) for n in adapted_names(model)})


def mark_trainable(model: nn.Module, extra=()) -> list[str]:
    """Freeze every parameter but the LoRA A/B and those named in `extra`; return the trainable names."""
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith((".lora_A", ".lora_B")) or n in extra)
        if p.requires_grad:
            names.append(n)
    return names


def merge(model: nn.Module):
    for m in lora_layers(model):
        m.merge()


def unmerge(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()


def file_layout(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter name -> {the name(s) files use: a view of it}. A fused layer's weight splits into its
    parts' rows (`self_attn.qkv_proj.weight` -> `self_attn.q_proj.weight`, ...), its LoRA into each adapted
    part's A rows and B block (`self_attn.q_proj.lora_A`); every other parameter keeps its name. Views share
    the parameters' memory: copying into them loads the model."""
    out = {}
    for mname, m in model.named_modules():
        parts = getattr(m, "parts", None)
        for pname, p in m.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if not parts:
                out[name] = {name: p}
            elif pname == "weight":
                out[name] = {f"{part_name(mname, q)}.weight": w for q, w in zip(parts, p.chunk(len(parts)))}
            else:  # lora_A / lora_B of a fused layer
                r = m.r
                out[name] = {f"{part_name(mname, q)}.{pname}": p[j * r:(j + 1) * r] if pname == "lora_A"
                             else p[rows, j * r:(j + 1) * r] for j, (rows, q) in enumerate(m.blocks())}
    return out


def file_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under the names files use (see file_layout), as views."""
    return {n: t for views in file_layout(model).values() for n, t in views.items()}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA A/B tensors, under the names files use (`...q_proj.lora_A`), as copies."""
    return {n: t.detach().clone() for n, t in file_tensors(model).items() if n.endswith((".lora_A", ".lora_B"))}
