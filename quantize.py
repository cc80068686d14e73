"""How the decoder's linear weights are held for decoding (chat.py / eval.py / serve.py): fp16, bf16, int8 or 4-bit.

Why: decoding one token reads every weight once, so its speed is the bytes read (LLaMA-7B + the cross-attention
blocks + lm_head: 15.5 GB in bf16, 7.8 in int8, ~4.1 in 4-bit). What is held this way: every linear layer of the
decoder (self-attention, MLP, the gated cross-attention blocks) and lm_head, after LoRA is merged into them (chat
never trains). The ViT, the perceiver, the embeddings and norms stay as they are.

  int8   one scale per output row: row i of W is round(W_i / s_i), s_i = max|W_i| / 127 (off by at most s_i / 2)
  int4   one scale per group of `group_size` inputs: W = (q - 8) * s, q in 0..15, s = max|W_group| / 7
  bf16   (a CPU only) the weight as it is, for the two ways it is multiplied below
  fp16   (an x86 CPU only) the weight in fp16, packed at load for fbgemm's fp16 GEMM, which PyTorch carries
         (Fp16Linear): for one row or many, it turns the weights into fp32 in registers, each read once a product

How the others are multiplied on a CPU, where no PyTorch kernel reads int8 or int4 weights at the memory's speed for
one row:
  a few rows (decoding)    a fused kernel that torch.compile writes per layer shape: the codes are loaded as packed
                           32-bit words, each byte / nibble (bf16: each half) masked in place, turned into fp32 and
                           summed against the row in registers, so the weights cross the memory bus once a row, in
                           their packed size; a row too long for the L1 cache meets several rows of W per load.
  many rows (prefill)      int8 with a few bf16 rows (Int8Linear.pack_rows_max): PyTorch's _weight_int8pack_mm on the
                           packed codes, the rows' inputs permuted to their order. Otherwise blocks of rows are
                           unpacked into an fp32 buffer that stays in the cache, and each block is multiplied by
                           oneDNN's fp32 GEMM: an AVX2 CPU has no bf16 arithmetic, and its fp32 GEMM runs several times
                           faster than a bf16 one.
On a GPU the weights are unpacked in the matmul's dtype and multiplied by F.linear; compiled (chat.py's fast path),
inductor fuses the unpacking into the matmul's loads.

The packed layouts (both keep each output row's codes together, so a layer can be quantized row block by row block):
  int8  (out, in/4) int32: byte b of word j holds input b * in/4 + j
  int4  (out, in/block, block/8) int32 with block = max(group_size, 64): nibble b of word j of a block holds the
        block's input b * block/8 + j, so each nibble plane is a contiguous run of inputs within one group
"""
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

import lora

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
BLOCK_ROWS = 256            # rows unpacked at a time for a several-row product: 4 MB of fp32 at 4,096 inputs
QUANTIZE_ROWS = 512         # rows quantized at a time (bounds the temporaries while loading)
FUSED_MIN_WEIGHTS = 1 << 20  # smaller layers are unpacked eagerly: compiling kernels for them is not worth it
LONG_INPUTS = 8192          # an fp32 row longer than this overflows a 32 KB L1 cache: the one-row kernels then take
                            # several rows of W at a time (`together`), so that each load of the row serves them all


def is_quantized(name: str) -> bool:
    """Which linear layers are held this way, by module name: the decoder's and lm_head."""
    return name.startswith(("layers.", "lm_head"))


def linear_bytes(out_features: int, in_features: int, mode: str, group_size: int = 128, scale_bytes: int = 2) -> int:
    """Bytes a quantized linear layer's weight holds (codes + scales), for sizing memory before loading."""
    if mode in ("bf16", "fp16"):
        return out_features * in_features * 2
    if mode == "int8":
        return out_features * (_ceil(in_features, 4) + scale_bytes)
    block = max(group_size, 64)
    return out_features * (_ceil(in_features, block) // 2 + _ceil(in_features, block) // group_size * scale_bytes)


def quantize_linear(linear: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """The replacement of one materialized linear layer (its weight in bf16/fp16/fp32, LoRA merged)."""
    if mode == "int8":
        return Int8Linear(linear.weight, linear.bias)
    if mode == "int4":
        return Int4Linear(linear.weight, linear.bias, group_size)
    if mode == "bf16":
        return Bf16Linear(linear.weight, linear.bias)
    if mode == "fp16":
        return Fp16Linear(linear.weight, linear.bias)
    raise ValueError(f"quantization {mode!r}: one of {MODES}")


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 128) -> nn.Module:
    """Replace the decoder's linear layers and lm_head, in place (LoRA merged first). Returns model."""
    lora.merge(model)
    for name, m in [(n, m) for n, m in model.named_modules() if is_quantized(n)]:
        if isinstance(m, (nn.Linear, lora.LoRALinear)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, quantize_linear(m, mode, group_size))
    finish_packing(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The layers


class PackedLinear(nn.Module):
    """y = x @ W.T (+ bias) with W held packed: subclasses say how to unpack rows and how to multiply one row."""
    one_row_max = 16    # up to this many rows, the one-row kernel row by row beats unpacking the layer to fp32
    together_long = 8   # rows of W a long row meets per load (their sums and the row's pieces fill AVX2's registers)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fused = self.out_features * self.in_features >= FUSED_MIN_WEIGHTS
        long = self.in_features > LONG_INPUTS and self.out_features % self.together_long == 0
        self.together = self.together_long if long else 1
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu":
            y = F.linear(rows, self.unpacked(0, self.out_features, x.dtype))
        else:
            y = self.cpu_product(rows).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def cpu_product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (M, in) @ W.T on a CPU: up to one_row_max rows one at a time through the one-row kernel, more in
        blocks."""
        if len(rows) == 1 and self.fused:
            return self.one_row(rows.float())
        if len(rows) <= self.one_row_max and self.fused:
            return torch.cat([self.one_row(row) for row in rows.float().split(1)])
        return self.blocks(rows.float())

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) fp32 @ W.T, BLOCK_ROWS rows of W at a time unpacked to fp32, each block small enough to stay in
        the cache between its unpacking and its product."""
        out = torch.empty(len(x), self.out_features)
        for start in range(0, self.out_features, BLOCK_ROWS):
            end = min(start + BLOCK_ROWS, self.out_features)
            out[:, start:end] = _fp32_product(x, self.fp32_rows(start, end))
        return out

    def fp32_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows start:end of W in fp32, on a CPU (the unpacking compiled: eager, it is a dozen passes)."""
        unpack = _compiled(self.unpack, dynamic=True) if self.fused else self.unpack
        return unpack(self.codes[start:end], self.scales[start:end], self.in_features, torch.float32)

    def unpacked(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start:end of W, (end - start, in_features), in dtype."""
        return self.unpack(self.codes[start:end], self.scales[start:end], self.in_features, dtype)


class Bf16Linear(PackedLinear):
    """The weight in bf16 as it is: one row by a compiled kernel (faster than oneDNN's bf16 matrix-vector product on
    an AVX2 CPU, and exact in fp32), several in fp32 blocks."""
    one_row_max = 3     # converting bf16 to fp32 is cheap: four rows already go as fast in blocks

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))
        self.fused = self.fused and self.in_features % 4 == 0     # its kernel reads W as 32-bit words, in halves

    def unpacked(self, start, end, dtype):
        return self.weight[start:end].to(dtype)

    def fp32_rows(self, start, end):
        """Converted into one buffer kept between calls: allocating 4 MB per block would page-fault it in."""
        buffer = _scratch(BLOCK_ROWS * self.in_features)[: (end - start) * self.in_features]
        return buffer.view(end - start, self.in_features).copy_(self.weight[start:end])

    def one_row(self, x):
        x, pieces = x[0], 2 if self.in_features > LONG_INPUTS else 1
        return _compiled(_bf16_row)(x[0::2].contiguous(), x[1::2].contiguous(), self.weight.view(torch.float32),
                                    self.together, pieces)


class Fp16Linear(nn.Module):
    """The weight in fp16, packed for fbgemm's fp16 GEMM (PyTorch's quantized.linear_dynamic_fp16; an x86 CPU with
    AVX2, see fbgemm_fp16): its micro-kernel turns the weights into fp32 in registers, so one row reads them at the
    memory's speed and a few or many rows multiply at the fp32 GEMM's rate, with no pass that unpacks W and none
    that repacks it per call, as MKL's GEMM does. fbgemm packs in a slow scalar loop (docs/speed.md): in background
    threads while loading goes on (_pack_later)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._packed = _pack_later(weight)

    @property
    def packed(self):
        """fbgemm's packed weight, waited for."""
        if isinstance(self._packed, Future):
            self._packed = self._packed.result()
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def fbgemm_fp16() -> bool:
    """Whether Fp16Linear runs here: PyTorch's x86 builds carry fbgemm, whose kernels need AVX2."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def finish_packing(model: nn.Module):
    """Wait for the Fp16Linear layers' packing (an error in it is raised here, while loading)."""
    for m in model.modules():
        if isinstance(m, Fp16Linear):
            m.packed


class Int8Linear(PackedLinear):
    """Symmetric int8 with one scale per output row (scales in the original weight's dtype)."""
    pack_rows_max = 32  # bf16 rows up to this many go through PyTorch's int8 kernel (cpu_product), more in blocks

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.register_buffer("codes", torch.empty(self.out_features, _ceil(self.in_features, 4) // 4,
                                                  dtype=torch.int32, device=weight.device))
        self.register_buffer("scales", torch.empty(self.out_features, dtype=weight.dtype, device=weight.device))
        if not weight.is_meta:      # laid out on the meta device (checkpoints.plan_converted), it holds no values
            self.pack(weight)

    def pack(self, weight):
        for start in range(0, self.out_features, QUANTIZE_ROWS):     # a few MB of temporaries at a time
            w = weight[start:start + QUANTIZE_ROWS].detach().float()
            scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127      # an all-zero row stays zero, not NaN
            q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int32) & 255
            q = F.pad(q, (0, self.codes.shape[1] * 4 - self.in_features)).view(len(w), 4, -1)
            self.codes[start:start + len(w)] = q[:, 0] | q[:, 1] << 8 | q[:, 2] << 16 | q[:, 3] << 24
            self.scales[start:start + len(w)] = scales

    def cpu_product(self, rows):
        """A few bf16 rows (a short prefill, a batch): PyTorch's int8 x bf16 kernel reads the codes as they are
        packed, if the rows' inputs come in the packed order (input b * in/4 + j at 4j + b): faster than unpacking
        blocks to fp32 up to pack_rows_max rows (its time grows with the rows, 4 at a time; the blocks' GEMM less).
        One row, more rows, or fp32 rows (for which that kernel is slow): the base's ways."""
        if rows.dtype != torch.bfloat16 or not 1 < len(rows) <= self.pack_rows_max or self.in_features % 4:
            return super().cpu_product(rows)
        if len(rows) % 4 == 1 and self.fused:   # that kernel takes rows 4 at a time: a lone last row costs a pass
            return torch.cat([self.cpu_product(rows[:-1]), self.one_row(rows[-1:].float()).to(rows.dtype)])
        packed_order = rows.view(len(rows), 4, -1).transpose(1, 2).reshape(len(rows), -1)
        return torch.ops.aten._weight_int8pack_mm(packed_order, self.codes.view(torch.int8),
                                                  self.scales.to(torch.bfloat16))

    @staticmethod
    def unpack(codes, scales, in_features: int, dtype):
        """Each byte turned into dtype and scaled before the four are stacked: compiled, that is one pass that
        writes W (stacking the integer bytes first costs a second pass, over an int32 copy)."""
        s = scales[:, None].to(dtype)
        q = torch.stack([((codes << (24 - 8 * b)) >> 24).to(dtype) * s for b in range(4)], dim=1)
        return q.flatten(1)[:, :in_features]

    def one_row(self, x):
        """x (1, in_features) fp32 -> (1, out_features) fp32, on a CPU."""
        x = F.pad(x[0], (0, self.codes.shape[1] * 4 - self.in_features)).view(4, -1)    # x[b] meets byte b
        xs, offset = x * _BYTE_PLACES[:, None], 128 * x[:3].sum()
        return _compiled(_int8_row)(xs, offset, self.codes.view(torch.float32), self.scales, self.together)


class Int4Linear(PackedLinear):
    """4-bit codes with one scale per group of `group_size` inputs (scales in the original weight's dtype)."""
    one_row_max = 11    # splitting nibbles costs more than bytes: from 12 rows on, blocks go as fast
    together_long = 4   # with the row's 8 nibble planes, 8 sums would spill out of the registers

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128):
        super().__init__(weight, bias)
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {group_size}: one of {GROUP_SIZES}")
        self.group_size, block = group_size, max(group_size, 64)
        padded = _ceil(self.in_features, block)        # zero inputs past the end: their codes are 8, i.e. 0
        self.register_buffer("codes", torch.empty(self.out_features, padded // block, block // 8, dtype=torch.int32,
                                                  device=weight.device))
        self.register_buffer("scales", torch.empty(self.out_features, padded // group_size, dtype=weight.dtype,
                                                   device=weight.device))
        if not weight.is_meta:      # laid out on the meta device (checkpoints.plan_converted), it holds no values
            self.pack(weight)

    def pack(self, weight):
        group_size, block = self.group_size, self.codes.shape[2] * 8
        padded = self.codes.shape[1] * block
        for start in range(0, self.out_features, QUANTIZE_ROWS):     # a few MB of temporaries at a time
            w = F.pad(weight[start:start + QUANTIZE_ROWS].detach().float(), (0, padded - self.in_features))
            w = w.view(len(w), -1, group_size)
            scales = w.abs().amax(dim=2).clamp(min=1e-12) / 7
            q = (torch.round(w / scales[..., None]).clamp(-8, 7) + 8).to(torch.int32)
            q = q.view(len(w), padded // block, 8, block // 8)
            self.codes[start:start + len(w)] = sum(q[:, :, b] << (4 * b) for b in range(8))
            self.scales[start:start + len(w)] = scales

    @staticmethod
    def unpack(codes, scales, in_features: int, dtype):
        """As Int8Linear.unpack: each nibble plane turned into dtype and scaled (by its group's scale) before the
        eight are stacked."""
        rows, blocks, _ = codes.shape
        s = scales.to(dtype).view(rows, blocks, -1, 1)          # (rows, blocks, groups per block, 1)
        groups = s.shape[2]
        planes = [(((codes >> (4 * b)) & 15).to(dtype) - 8) * s[:, :, b * groups // 8] for b in range(8)]
        return torch.stack(planes, dim=2).flatten(1)[:, :in_features]

    def one_row(self, x):
        blocks, n = self.codes.shape[1:]
        x = F.pad(x[0], (0, blocks * n * 8 - self.in_features)).view(blocks, 8, n)
        groups = self.scales.shape[1] // blocks                 # scales per block
        xs = (x * _NIBBLE_PLACES[:, None]).transpose(0, 1).reshape(8, -1)              # xs[b] meets nibble b
        group_sums = x.view(blocks, groups, -1).sum(-1).flatten()
        return _compiled(_int4_row)(xs, group_sums, self.codes.view(torch.float32), self.scales, groups,
                                    self.together)


# ----------------------------------------------------------------------------------------------------------------
# The one-row kernels, written so that inductor fuses each into one loop over the packed words, with one accumulator
# per output row and few instructions per word (on two cores they are what bounds decoding, not the memory):
#  - the codes come in viewed as float32 and are bit-cast back inside (inductor's vector loads of int32 go through a
#    stack copy, its float loads do not);
#  - a byte or nibble is masked in place, not shifted down: w & (255 << 8b) is the byte times 2^8b, an exact float,
#    so x comes in divided by 2^8b (one_row, once a call) and each code costs a mask, a conversion and a multiply-add;
#  - codes are summed as unsigned (int8: bytes 0-2 flipped to q + 128 by one xor; int4: q + 8) and the offset times
#    the sum of x is taken off once a row;
#  - one reduction runs at most 4,096 values (longer, inductor sums in slow cascaded chunks for accuracy);
#  - a word's products are summed in pairs (_tree_sum), not in one chain of dependent adds.

_BYTE_PLACES = torch.tensor([2.0 ** (-8 * b) for b in range(4)])           # what x is divided by to meet byte b
_NIBBLE_PLACES = torch.tensor([2.0 ** (-4 * b) for b in range(7)] + [1.0])  # ... nibble b (the top one shifted)


def _bf16_row(x_even, x_odd, words, together: int, pieces: int):
    """A 32-bit word of W holds two bf16 weights: input 2j in its low half, 2j + 1 in its high half. A long row is
    summed in `pieces` reductions."""
    w = words.view(torch.int32).view(-1, together, pieces, words.shape[1] // pieces)
    x_even, x_odd = x_even.view(pieces, -1), x_odd.view(pieces, -1)
    rows = [((w[:, i] << 16).view(torch.float32) * x_even + (w[:, i] & -65536).view(torch.float32) * x_odd)
            .sum(-1).sum(-1) for i in range(together)]
    return torch.stack(rows, -1).flatten()[None]


def _int8_row(xs, offset, codes, scales, together: int):
    words = codes.view(torch.int32).view(-1, together, codes.shape[1]) ^ 0x808080
    masks = (255, 255 << 8, 255 << 16, -1 << 24)             # the top byte, kept signed, is q itself
    rows = [_tree_sum([(words[:, i] & mask).float() * xs[b] for b, mask in enumerate(masks)]).sum(-1)
            for i in range(together)]
    return ((torch.stack(rows, -1).flatten() - offset) * scales.float())[None]


def _int4_row(xs, group_sums, codes, scales, groups: int, together: int):
    _, blocks, n = codes.shape
    words = codes.view(torch.int32).view(-1, together, blocks * n)     # a row's words, block after block
    s = scales.float().view(-1, together, blocks, groups)
    planes = 8 // groups                                     # nibble planes per group
    rows = []
    for i in range(together):
        per_group = []
        for g in range(groups):                              # the group's scale, repeated over its block's words
            scale = s[:, i, :, g, None].expand(-1, -1, n).reshape(-1, blocks * n)
            dot = _tree_sum([_nibble(words[:, i], b) * xs[b] for b in range(g * planes, (g + 1) * planes)])
            per_group.append(dot * scale)
        rows.append(_tree_sum(per_group).sum(-1))
    return (torch.stack(rows, -1).flatten() - 8 * (scales.float() * group_sums).sum(-1))[None]     # codes are q + 8


def _tree_sum(terms: list):
    """The terms summed in pairs: a left-to-right sum is one chain of dependent adds (8 long for the nibbles), whose
    latency, not the adds, would bound the loop."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _nibble(words, b: int):
    """Nibble b of each word, times 2^4b (the top one shifted down: masked, it would come out signed)."""
    return (words & (15 << 4 * b)).float() if b < 7 else ((words >> 28) & 15).float()


_compiled_fns: dict = {}
_thread = threading.local()


def _compiled(fn, dynamic: bool = False):
    """fn compiled once per process; for exact shapes unless dynamic (a 7B model has ~9 layer shapes: more than
    Dynamo's default 8 graphs per function, a per-thread setting, raised in each thread that multiplies). Inside
    a compiled region (the engine's fast path) fn itself, traced into that region's graph."""
    if torch.compiler.is_compiling():
        return fn
    if not getattr(_thread, "ready", False):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _thread.ready = True
    if fn not in _compiled_fns:
        # A product and the sum it goes into may become one multiply-add (inductor's default keeps them apart: more
        # instructions, in kernels that their instructions bound)
        _compiled_fns[fn] = torch.compile(fn, dynamic=dynamic,
                                          options={"cpp.enable_floating_point_contract_flag": "fast"})
    return _compiled_fns[fn]


def _pack_later(weight: torch.Tensor) -> Future:
    """fbgemm's packing of weight in a background thread, one per core PyTorch uses: loading reads and merges the
    next layers meanwhile. At most twice that many wait, each holding its weight (a few layers' worth of memory)."""
    global _packers, _waiting
    if _packers is None:
        threads = torch.get_num_threads()
        _packers, _waiting = ThreadPoolExecutor(threads, "fbgemm-pack"), threading.BoundedSemaphore(2 * threads)
    _waiting.acquire()
    future = _packers.submit(lambda: torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), None))
    future.add_done_callback(lambda _: _waiting.release())
    return future


_packers: ThreadPoolExecutor | None = None
_waiting: threading.BoundedSemaphore | None = None


_ONEDNN = torch.backends.mkldnn.is_available()     # asked once: the compiled decode step cannot ask


def _fp32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in fp32 on a CPU: oneDNN's, where PyTorch carries it, beat MKL's GEMM (F.linear's) at most row
    counts from a few to a hundred, and needs no padding of the rows to a multiple of 8 (docs/speed.md)."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def _scratch(n: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least n values, kept between calls."""
    buffer = getattr(_thread, "buffer", None)
    if buffer is None or buffer.numel() < n:
        buffer = _thread.buffer = torch.empty(n)
    return buffer


def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
