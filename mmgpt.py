"""MultiModal-GPT = OpenFlamingo (CLIP ViT -> perceiver resampler -> LLaMA with gated cross-attention) + LoRA.

Read top-down:
  Config, PRESETS, Tokenizer         what the model is, named sizes, how text becomes ids (MultiModal-GPT's ids)
  RMSNorm, RoPE, Attention, MLP      the LLaMA decoder, written out (HF layout: rotate-half RoPE; q/k/v and gate/up
                                     each one fused matmul, files still name the parts)
  VisionEncoder                      open_clip's ViT, returning patch tokens WITHOUT ln_post (see its docstring)
  MMGPT                              the whole model: forward / loss for training, extend() for KV-cached decoding
  lm_loss, sample, generate          the masked next-token loss and decoding
  build                              a random model made directly on its device and dtype

The weight files (HF LLaMA dirs, OpenFlamingo checkpoint.pt, MultiModal-GPT LoRA .pt, load()) are in checkpoints.py.
"""
import contextlib
import copy
import re
from dataclasses import dataclass, field

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from perceiver import GatedCrossAttentionBlock, PerceiverResampler, media_index

# The open_clip ViT-L/14 that OpenFlamingo-9B uses (open_clip's own "ViT-L-14" config).
VIT_L_14 = {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}}


@dataclass
class Config:
    # LLaMA (defaults: LLaMA-7B). vocab_size counts the 3 added tokens: sentencepiece's V + 3.
    vocab_size: int = 32003
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    hidden_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Flamingo. xattn_layers: decoder layers that get a gated cross-attention block BEFORE them; by default
    # every 4th, layer i when (i + 1) % 4 == 0 (OpenFlamingo-9B: 3, 7, ..., 31).
    image_id: int = 32001
    # The media-masking rule (perceiver.media_index): False = OpenFlamingo v1's, which the released weights
    # need; True = attend_previous, each token sees the picture before it (the demo trains with it).
    attend_previous: bool = False
    xattn_layers: tuple | None = None
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    perceiver_depth: int = 6
    perceiver_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    # open_clip model config ({"embed_dim", "vision_cfg", optional "quick_gelu"}); only the vision tower is built.
    vision: dict = field(default_factory=lambda: dict(VIT_L_14, quick_gelu=True))

    def __post_init__(self):
        if self.xattn_layers is None:
            self.xattn_layers = tuple(i for i in range(self.n_layers) if (i + 1) % 4 == 0)
        self.xattn_layers = tuple(self.xattn_layers)

    @property
    def vision_dim(self) -> int:
        return self.vision["vision_cfg"]["width"]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Named configs (vocab_size / image_id come from the tokenizer unless given). "7b": OpenFlamingo-9B's shapes, the
# Config defaults; "demo": the built-in demo's base model; "tiny": the tests'; "bench-tiny": bench.py --tiny, the
# full 32-layer depth at small widths (counting the ops one training step dispatches needs the real depth).
_SMALL_VISION = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "patch_size": 14}}
PRESETS = {
    "7b": {},
    "demo": dict(dim=192, n_layers=4, n_heads=6, hidden_dim=512, max_seq_len=256, xattn_layers=(0, 1, 2, 3),
                 perceiver_depth=2, perceiver_latents=16,
                 vision={"embed_dim": 64, "quick_gelu": False, "vision_cfg": {"image_size": 32, "layers": 2,
                                                                              "width": 128, "patch_size": 8,
                                                                              "head_width": 32}}),
    "tiny": dict(dim=64, n_layers=4, n_heads=4, hidden_dim=128, max_seq_len=256, xattn_layers=(1, 3),
                 perceiver_depth=2, perceiver_latents=4, vision=_SMALL_VISION),
    "bench-tiny": dict(vocab_size=512, image_id=509, dim=128, n_layers=32, n_heads=4, hidden_dim=256,
                       max_seq_len=1024, perceiver_depth=2, perceiver_latents=8,
                       vision=dict(_SMALL_VISION, vision_cfg=dict(_SMALL_VISION["vision_cfg"], layers=2))),
}


def config(preset: str, **overrides) -> Config:
    """Config(**PRESETS[preset], **overrides): a named config with some fields changed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return Config(**copy.deepcopy({**PRESETS[preset], **overrides}))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """sentencepiece + the 3 tokens MultiModal-GPT adds, giving the ids of its LlamaTokenizer (transformers 4.28).

    The text is cut at special strings; whitespace next to the 3 added tokens is stripped on both sides (they
    were added as plain strings, which HF strips) but not next to <s>, </s>, <unk> (AddedTokens without strip);
    every remaining piece is encoded by sentencepiece on its own, so each gets its own dummy-prefix space.
    """
    ADDED = ("<|endofchunk|>", "<image>", "<PAD>")

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        n = self.sp.vocab_size()
        self.eoc_id, self.image_id, self.pad_id = n, n + 1, n + 2
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.vocab_size = n + 3
        self.special = {"<|endofchunk|>": n, "<image>": n + 1, "<PAD>": n + 2,
                        "<s>": self.bos_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        self.special_str = {i: s for s, i in self.special.items()}
        self._splitter = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def _pieces(self, text: str) -> list[str]:
        pieces = [p for p in self._splitter.split(text) if p]
        for i, p in enumerate(pieces):
            if p in self.ADDED:
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
                if i > 0:
                    pieces[i - 1] = pieces[i - 1].rstrip()
        return [p for p in pieces if p]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for p in self._pieces(text):
            ids += [self.special[p]] if p in self.special else self.sp.encode(p)
        return ids + ([self.eos_id] if eos else [])

    def encode_spans(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode() plus the character span (start, end) of text that each id came from (BOS: (0, 0))."""
        ids, spans = ([self.bos_id], [(0, 0)]) if bos else ([], [])
        pos = 0
        for p in self._pieces(text):
            start = text.index(p, pos)
            pos = start + len(p)
            if p in self.special:
                ids.append(self.special[p])
                spans.append((start, pos))
                continue
            # Rebuild each piece's bytes (▁ = space, <0xNN> = a byte) to find where in p it came from. With
            # LLaMA's identity normalisation the pieces spell out the dummy-prefix space followed by p exactly.
            pieces = self.sp.encode(p, out_type=str)
            raw = [bytes([int(x[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", x) else x.replace("▁", " ").encode()
                   for x in pieces]
            text_bytes = p.encode("utf-8")
            skip = len(b"".join(raw)) - len(text_bytes)  # the dummy prefix
            if skip not in (0, 1) or b"".join(raw)[skip:] != text_bytes:
                raise ValueError("encode_spans needs a sentencepiece model with identity normalisation (as LLaMA's)")
            # char_of[b]: the character that byte b belongs to (a piece may end inside a character: byte fallback)
            char_of = [i for i, ch in enumerate(p) for _ in ch.encode("utf-8")] + [len(p)]
            end = -skip
            for x, r in zip(pieces, raw):
                begin, end = max(end, 0), end + len(r)
                ids.append(self.sp.piece_to_id(x))
                spans.append((start + char_of[begin], start + char_of[max(end, 0)]))
        return ids, spans

    def decode(self, ids) -> str:
        out, run = [], []
        for i in list(ids):
            if i in self.special_str and i != self.unk_id:
                out.append(self.sp.decode(run))
                out.append(self.special_str[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def never_generate(self) -> list[int]:
        """Ids that generation must never emit."""
        return [self.image_id, self.eoc_id, self.pad_id, self.bos_id, self.unk_id]


# ----------------------------------------------------------------------------------------------------------------
# The LLaMA decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF LLaMA: normalise in fp32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: Config, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) for rotate-half RoPE (HF's layout; q/k weights are permuted for
    it), with rotate-half's sign folded into sin's first half: apply_rope then needs no negation."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): the minus lives in rope_tables' sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class FusedLinear(nn.Linear):
    """Several projections of the same input in one matmul: the `parts` side by side, out_features rows each
    (q/k/v: 3 matmuls become 1). Files (HF LLaMA, LoRA) still name the parts; lora.file_layout splits them."""

    def __init__(self, in_features: int, out_features: int, parts: tuple[str, ...]):
        super().__init__(in_features, out_features * len(parts), bias=False)
        self.parts = parts


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.dim, cfg.dim, ("q_proj", "k_proj", "v_proj"))
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, input_pos=None):
        """cos, sin: (T, 1, 1, head_dim) or per row (B, T, 1, 1, head_dim), already in the activations' dtype
        (MMGPT._layers casts them once)."""
        B, T, _ = x.shape
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.head_dim)
        qk = apply_rope(qkv[:, :, :2], cos, sin)             # q and k rotated together
        q, k, v = (t.transpose(1, 2) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]))  # (B, heads, T, d)
        if input_pos is not None:
            # KV-cached decoding: write this step's keys/values into the model's own cache buffers (MMGPT.setup_cache)
            # at input_pos and attend over the whole buffer (the mask hides the rest). The buffers are module state,
            # not inputs, and every decode step has the same shapes: it compiles once and runs as one CUDA graph.
            k, v = self.k_cache.index_copy_(2, input_pos, k), self.v_cache.index_copy_(2, input_pos, v)
        if mask is None:  # plain causal (no padding, no cache)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.dim, cfg.hidden_dim, ("gate_proj", "up_proj"))
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """A LLaMA layer; `xattn` (a gated cross-attention block) runs before it when present."""

    def __init__(self, cfg: Config, with_xattn: bool):
        super().__init__()
        self.xattn = GatedCrossAttentionBlock(cfg.dim, cfg.vision_dim, cfg.xattn_heads, cfg.xattn_dim_head,
                                              cfg.ff_mult) if with_xattn else None
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, pictures=None, input_pos=None):
        """pictures: (this layer's keys/values of the pictures' latents, media_index, rows with pictures or None),
        or None for language-only input."""
        if self.xattn is not None and pictures is not None:
            kv, index, rows = pictures
            y = self.xattn(x, kv, index)
            # rows: in a batch that mixes rows with and without pictures, those without skip the block, as a
            # language-only forward does (the gated FFW would otherwise still change them).
            x = y if rows is None else torch.where(rows[:, None, None], y, x)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# Vision

def build_visual(vision_cfg: dict) -> nn.Module:
    """open_clip's vision tower alone (the text tower is never built)."""
    from open_clip.model import _build_vision_tower
    return _build_vision_tower(vision_cfg["embed_dim"], vision_cfg["vision_cfg"],
                               quick_gelu=vision_cfg.get("quick_gelu", False))


class VisionEncoder(nn.Module):
    """CLIP ViT -> the final block's patch tokens, CLS dropped, WITHOUT ln_post.

    That is what open_clip 2.16 returned and what OpenFlamingo's perceiver was trained on. open_clip 3.x's
    `output_tokens=True` applies ln_post to the tokens first, which silently changes the features, so the tower
    is run step by step here instead.
    """

    def __init__(self, vision_cfg: dict):
        super().__init__()
        self.visual = build_visual(vision_cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)      # (B, patches, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.transformer(v.ln_pre(x))                                                 # batch-first in open_clip 3
        return x[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# The model

class MMGPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.perceiver = PerceiverResampler(cfg.vision_dim, cfg.perceiver_depth, cfg.perceiver_latents,
                                            cfg.perceiver_heads, cfg.perceiver_dim_head, cfg.ff_mult)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i in cfg.xattn_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, self.embed_tokens.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False

    # -- pictures ---------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) -> perceiver latents (B, N, latents, vision_dim). A frozen ViT (the paper's) keeps no
        activations for backward; one being trained (train.py --vision-lr) does."""
        B, N = images.shape[:2]
        # Checked only when gradients are on: decoding (no_grad) never walks the ViT's parameters.
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trained):
            patches = self.vision(images.flatten(0, 1))
        return self.perceiver(patches.view(B, N, *patches.shape[1:]).to(self.perceiver.latents.dtype))

    def picture_kv(self, latents: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each cross-attention layer's keys/values of the pictures' latents (computed once per picture)."""
        return {i: self.layers[i].xattn.attn.picture_kv(latents) for i in self.cfg.xattn_layers}

    # -- training / full forward ------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask=None, attend_previous: bool | None = None):
        """images: (B, N, 3, H, W) in the order of the <image> tokens, or None for language-only (then the
        cross-attention blocks are skipped entirely); attention_mask: (B, T) 1 = token, 0 = right padding;
        attend_previous: the media-masking rule, by default cfg.attend_previous. Returns logits (B, T, vocab)."""
        return self.lm_head(self.norm(self.hidden(images, input_ids, attention_mask, attend_previous)))

    def loss(self, images, input_ids, labels, attend_previous: bool | None = None):
        """lm_loss(forward(...), labels), with the final norm and lm_head applied only where a next-token label
        exists: no (T, vocab) logits for the prompt. Mean over the labelled positions of all rows; a row without
        labels adds nothing, and a batch without any gives NaN, as lm_loss does.

        No attention_mask: right padding (all the loader makes) changes nothing here -- causal attention never
        lets a token see a later pad, and pads carry no labels -- so the layers run the unmasked causal path.
        Selecting the labelled positions has a data-dependent size (one host sync), outside the decoder layers."""
        h = self.hidden(images, input_ids, attend_previous=attend_previous)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm_head(self.norm(h[keep]))
        return F.cross_entropy(logits.float(), targets[keep])

    def hidden(self, images, input_ids, attention_mask=None, attend_previous: bool | None = None):
        """The last decoder layer's output (B, T, dim), before the final norm (forward's arguments)."""
        kv = None if images is None else self.picture_kv(self.encode_images(images))
        rule = self.cfg.attend_previous if attend_previous is None else attend_previous
        index = media_index(input_ids, self.cfg.image_id, rule)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            T = input_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
        return self._layers(input_ids, kv, index, mask)

    def _decode(self, input_ids, kv, index, mask, input_pos=None, positions=None, rows=None, last=None):
        """Logits of the decoder over input_ids. Cached decoding passes input_pos (the cache columns written),
        positions (B, T: each row's RoPE positions), rows (which rows have pictures, or None) and last (the one
        position whose logits are wanted)."""
        x = self._layers(input_ids, kv, index, mask, input_pos, positions, rows)
        if last is not None:
            x = x.index_select(1, last)
        return self.lm_head(self.norm(x))

    def _layers(self, input_ids, kv, index, mask, input_pos=None, positions=None, rows=None):
        x = self.embed_tokens(input_ids)
        T = input_ids.shape[1]
        cos, sin = ((self.rope_cos[:T], self.rope_sin[:T]) if positions is None
                    else (self.rope_cos[positions], self.rope_sin[positions]))
        # Cast once here, not in every layer, to the dtype q/k will have; shaped (..., T, 1, 1, d) for q/k's
        # (B, T, 2, heads, d) layout.
        dtype = self.activation_dtype()
        cos, sin = (t.to(dtype)[..., None, None, :] for t in (cos, sin))
        for i, layer in enumerate(self.layers):
            pictures = (kv[i], index, rows) if kv is not None and layer.xattn is not None else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, pictures, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, pictures, input_pos)
        return x

    # -- KV-cached decoding -----------------------------------------------------------------------------------
    def new_cache(self, max_len: int | None = None) -> "KVCache":
        """A batch-1 cache for extend(). Its keys/values are the model's buffers: the last cache made owns them."""
        self.cache_owner = KVCache(self, max_len or self.cfg.max_seq_len)
        return self.cache_owner

    def activation_dtype(self) -> torch.dtype:
        """The dtype keys and values come out in: autocast's when it is on (a fp32 model trained in bf16)."""
        device = self.rope_cos.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.embed_tokens.weight.dtype

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype):
        """Allocate each attention layer's key/value buffers (batch, heads, max_len, head_dim), unless the present
        ones already fit: reallocating would move them, and a captured CUDA graph with them."""
        attn = self.layers[0].self_attn
        old = getattr(attn, "k_cache", None)
        if old is not None and old.shape[0] == batch and old.shape[2] >= max_len and old.dtype == dtype:
            return
        shape = (batch, self.cfg.n_heads, max_len, self.cfg.head_dim)
        for layer in self.layers:
            for name in ("k_cache", "v_cache"):
                layer.self_attn.register_buffer(name, torch.zeros(shape, device=self.rope_cos.device, dtype=dtype),
                                                persistent=False)

    def compile_decoding(self, mode: str | None = None, backend: str = "inductor",
                         buckets: tuple = (16, 32, 64, 128, 256, 512, 1024, 2048)):
        """The fast path: the decode step compiled once (on a GPU with CUDA graphs), the prefill compiled per
        length bucket (a prompt is padded up to the next bucket, which never changes its logits), the ViT
        compiled. mode: the decode step's torch.compile mode (default: reduce-overhead on cuda)."""
        cuda = self.rope_cos.device.type == "cuda"
        # One graph per bucket and per number of pictures: more than dynamo's default limit of 8 per function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        options = dict(backend=backend, fullgraph=True, dynamic=False)
        self.fast = FastDecoding(
            decode=torch.compile(self.decode_step, mode=mode or ("reduce-overhead" if cuda else None), **options),
            prefill=torch.compile(self.decode_step, **options), buckets=tuple(buckets))
        # The ViT only: inductor's attention-fusion pass fails on the perceiver's 5-d attention (torch 2.14).
        self.vision.compile(**options)

    def _step(self, input_ids: list[list[int]], index: torch.Tensor, kv, input_pos: int, start: torch.Tensor,
              rows=None) -> torch.Tensor:
        """Run input_ids (B rows of T ids, written at cache columns input_pos.., row b's sequence beginning at
        column start[b]; index: their pictures, (B, T) on the host) through decode_step; logits (B, vocab) after
        the last column. On the fast path a prefill is padded on the right up to its length bucket: the padding
        comes after the real tokens, so they never see it, and the columns it writes lie past the context,
        overwritten before they are ever attended to."""
        device = self.rope_cos.device
        T, step, width = len(input_ids[0]), self.decode_step, len(input_ids[0])
        fast = getattr(self, "fast", None)
        if fast is not None:
            if T == 1:
                step = fast.decode
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer used
            else:
                room = self.layers[0].self_attn.k_cache.shape[2] - input_pos
                width = next((b for b in fast.buckets if T <= b <= room), None)
                step, width = (fast.prefill, width) if width else (self.decode_step, T)   # no bucket fits: eager
        # The step's small inputs go to the device in one copy: the only other host sync of a decoded token is
        # reading it back.
        B = len(input_ids)
        packed = torch.cat([torch.tensor([row + [0] * (width - T) for row in input_ids]).flatten(),
                            F.pad(index, (0, width - T)).flatten(),
                            torch.arange(input_pos, input_pos + width), torch.tensor([T - 1])]).to(device)
        ids, index, input_pos, last = packed.split([B * width, B * width, width, 1])
        return step(ids.view(B, width), kv, index.view(B, width), input_pos, start, last, rows)

    @torch.no_grad()
    def extend(self, cache: "KVCache", ids: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        """Append `ids` (batch 1) to the cached sequence; return the logits (vocab,) after its last token.

        images: (1, n, 3, H, W) for the n <image> tokens in ids. With the default masking rule, the tokens after
        the previous picture belong to the NEXT picture, so a new picture changes them: they are dropped from
        the cache and computed again (under attend_previous a token's picture never changes). The result always
        equals a full forward over cache.ids.
        """
        n_new = ids.count(self.cfg.image_id)
        if n_new != (0 if images is None else images.shape[1]):
            raise ValueError(f"{n_new} <image> tokens but {0 if images is None else images.shape[1]} pictures")
        if not ids or len(cache.ids) + len(ids) > cache.max_len:  # checked before the cache changes
            raise ValueError(f"cannot extend a context of {len(cache.ids)} tokens by {len(ids)} "
                             f"(the cache holds {cache.max_len})")
        dtype = self.activation_dtype()
        if getattr(self, "cache_owner", None) is not cache or cache.dtype not in (None, dtype):
            if cache.ids:   # its keys/values were overwritten (a newer cache), or would be read in another dtype
                raise ValueError("this KVCache can no longer be extended: a newer one (model.new_cache) took the "
                                 "model's key/value buffers, or it was made in another dtype (autocast on/off)")
            self.cache_owner = cache
        cache.dtype = dtype
        self.setup_cache(1, cache.max_len, dtype)
        picture_kv = cache.picture_kv
        if n_new:
            kv = self.picture_kv(self.encode_images(images.to(self.rope_cos.device)))
            picture_kv = kv if picture_kv is None else {
                i: tuple(torch.cat([a, b], dim=2) for a, b in zip(picture_kv[i], kv[i])) for i in kv}
            if not self.cfg.attend_previous:
                last = max((p for p, t in enumerate(cache.ids) if t == self.cfg.image_id), default=-1)
                ids = cache.ids[last + 1:] + ids
                cache.truncate(last + 1)
        index = media_index(torch.tensor([ids]), self.cfg.image_id, self.cfg.attend_previous,
                            images_before=cache.ids.count(self.cfg.image_id))
        start = torch.zeros(1, dtype=torch.long, device=self.rope_cos.device)
        logits = self._step([ids], index, picture_kv, len(cache.ids), start)
        # Only now is the cache updated: interrupted above (Ctrl-C), it still holds a valid (shorter) context.
        cache.ids += ids
        cache.picture_kv = picture_kv
        return logits[0]

    def decode_step(self, input_ids, kv, index, input_pos, start, last, rows=None):
        """One cached forward: input_ids (B, T) written at cache columns input_pos (T,), row b's sequence starting
        at column start[b] (left padding before it); logits (B, vocab) at column `last` (1,). What the fast path
        compiles: everything here is a tensor of fixed shape, the masks are made inside."""
        cols = torch.arange(self.layers[0].self_attn.k_cache.shape[2], device=input_ids.device)
        # Each row sees its own columns up to the query's; a padding column sees itself (a row that sees nothing
        # would be NaN, and a NaN key/value poisons the real rows even where the mask hides it).
        mask = ((cols <= input_pos[:, None]) & (cols >= start[:, None, None])) | (cols == input_pos[:, None])
        positions = (input_pos - start[:, None]).clamp(min=0)
        return self._decode(input_ids, kv, index, mask[:, None], input_pos, positions, rows, last)[:, 0]


@dataclass
class FastDecoding:
    """MMGPT.compile_decoding's compiled steps and the prefill length buckets."""
    decode: object
    prefill: object
    buckets: tuple


class KVCache:
    """A cached batch-1 sequence: its token ids and the pictures' cross-attention K/V (fixed in shape per number of
    pictures). The keys/values themselves are the model's buffers, as gpt-fast keeps them, so a compiled decode
    step mutates no input; they are (re)made at the first extend, in the dtype the activations have."""

    def __init__(self, model: MMGPT, max_len: int):
        self.max_len, self.image_id = max_len, model.cfg.image_id
        self.dtype = None
        self.ids: list[int] = []
        self.picture_kv = None

    def reset(self):
        self.ids, self.picture_kv = [], None

    def truncate(self, n: int):
        """Keep the first n tokens (and the pictures among them); what lies past them is masked, then overwritten."""
        del self.ids[n:]
        pictures = self.ids.count(self.image_id)
        if self.picture_kv is not None:
            self.picture_kv = {i: (k[:, :, :pictures], v[:, :, :pictures]) for i, (k, v) in self.picture_kv.items()} \
                if pictures else None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t, over labels != -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def sample(logits: torch.Tensor, banned: list[int] | torch.Tensor, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
           generator: torch.Generator | None = None) -> int:
    """The next token, chosen where the logits are (on the GPU); int() at the end is the one host sync."""
    logits = logits.float().clone()
    logits[banned] = -float("inf")
    if greedy or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: MMGPT, cache: KVCache, ids: list[int], images=None, *, max_new_tokens: int = 256,
             eos_id: int, banned: list[int], **sampling):
    """Extend the cache with ids (and their pictures), then yield new token ids until EOS or the limit.

    Every yielded token is fed back, so cache.ids is always the whole context; EOS is neither yielded nor
    cached (the caller closes the answer with `</s>` in the next round's text)."""
    logits = model.extend(cache, ids, images)
    banned = torch.tensor(banned, dtype=torch.long, device=logits.device)   # once, not a copy per token
    for _ in range(max_new_tokens):
        token = sample(logits, banned, **sampling)
        if token == eos_id:
            return
        yield token
        logits = model.extend(cache, [token])


@torch.no_grad()
def generate_batch(model: MMGPT, prompts: list[list[int]], images: list[torch.Tensor | None], *,
                   max_new_tokens: int, eos_id: int, banned: list[int]) -> list[list[int]]:
    """Greedy answers to several prompts at once; each row's ids equal generate()'s for that prompt alone.

    images[i]: (n_i, 3, H, W) for the n_i <image> tokens of prompts[i], or None. The prompts are padded on the
    left to a common length; each row's RoPE positions start at its own first token and its attention never sees
    the padding, so padding changes none of its tokens. All pictures are encoded in one call; rows without any
    skip the cross-attention blocks, as a language-only forward does. A row ends at EOS (not returned) or after
    max_new_tokens; finished rows ride along until every row is done."""
    device, cfg = model.rope_cos.device, model.cfg
    if len(prompts) != len(images) or not prompts or not all(prompts):
        raise ValueError("generate_batch needs as many pictures entries as prompts, and no empty prompt")
    counts = [p.count(cfg.image_id) for p in prompts]
    for i, (n, im) in enumerate(zip(counts, images)):
        if n != (0 if im is None else im.shape[0]):
            raise ValueError(f"prompt {i}: {n} <image> tokens but {0 if im is None else im.shape[0]} pictures")
    B, T = len(prompts), max(map(len, prompts))
    fast = getattr(model, "fast", None)
    if fast is not None:   # pad the prompt length up to a bucket (more left padding): one compiled prefill per bucket
        T = next((b for b in fast.buckets if T <= b and b + max_new_tokens <= cfg.max_seq_len), T)
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({T} tokens) and {max_new_tokens} new tokens pass the model's "
                         f"context of {cfg.max_seq_len}")
    model.cache_owner = None    # batch-1 caches lose the buffers to this batch
    model.setup_cache(B, T + max_new_tokens, model.activation_dtype())
    kv, rows = None, None
    if any(counts):
        pictures = torch.cat([im for im in images if im is not None]).to(device)
        latents = model.encode_images(pictures[None])[0]                              # (all pictures, n, dv)
        padded = latents.new_zeros(B, max(counts), *latents.shape[1:])
        firsts = [sum(counts[:i]) for i in range(B)]
        for i, (first, n) in enumerate(zip(firsts, counts)):
            padded[i, :n] = latents[first:first + n]
        kv = model.picture_kv(padded)
        rows = torch.tensor([n > 0 for n in counts], device=device) if not all(counts) else None
    ids = [[0] * (T - len(p)) + p for p in prompts]                                   # left padding
    index = torch.cat([F.pad(media_index(torch.tensor([p]), cfg.image_id, cfg.attend_previous), (T - len(p), 0))
                       for p in prompts])
    start = torch.tensor([T - len(p) for p in prompts], device=device)
    # A new token's picture: under attend_previous the row's last; by the default rule none (text after the last
    # picture sees no picture).
    step_index = torch.tensor([[n if cfg.attend_previous else 0] for n in counts])
    banned = torch.tensor(banned, dtype=torch.long, device=device)
    logits = model._step(ids, index, kv, 0, start, rows)
    out, done = [[] for _ in prompts], [False] * B
    for t in range(max_new_tokens):
        logits = logits.float()
        logits[:, banned] = -float("inf")
        tokens = logits.argmax(-1).tolist()        # the one host sync per step
        for i, token in enumerate(tokens):
            if not done[i]:
                done[i] = token == eos_id
                if not done[i]:
                    out[i].append(token)
        if all(done) or t == max_new_tokens - 1:
            break
        logits = model._step([[x] for x in tokens], step_index, kv, T + t, start, rows)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Making a model

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype`: never an fp32 copy of the frozen weights."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cfg: Config, device="cpu", dtype=torch.float32) -> MMGPT:
    """A randomly initialised model made directly on `device` in `dtype`, cross-attention gates at zero."""
    with torch.device(device), default_dtype(dtype):
        model = MMGPT(cfg)
    return model


def __getattr__(name):
    """The file formats live in checkpoints.py; `mmgpt.load(...)` and the other names that were here still work."""
    import checkpoints
    try:
        return getattr(checkpoints, name)
    except AttributeError:
        raise AttributeError(f"module 'mmgpt' has no attribute {name!r}") from None

