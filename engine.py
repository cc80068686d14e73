"""Decoding: one batched engine with slots, shared by chat.py, eval.py, train.py's evaluation, bench.py and serve.py.

    engine = Engine(model, tokenizer, slots=8)
    done = engine.generate([Request(ids, pictures, max_tokens=32), ...])      # blocking (eval.py, train.py)
    engine.submit(request); outputs = engine.step()                           # a step at a time (chat.py, serve.py)

How it works (nano-vllm's scheduler / model-runner split; gpt-fast's static cache and compiled step):
- The cache (mmgpt.KVCache) has `slots` rows, each the keys/values of one sequence from column 0. A request runs in
  one slot: its prompt is prefilled, then every step decodes one token for all running requests at once.
  Requests join and leave between steps; nothing in a row depends on the other rows, so a request gets the same
  tokens whatever runs beside it. Requests that arrive together are prefilled together: their pictures in one
  pass of the ViT, their prompts in one forward, at most `prefill_tokens` tokens (padding included) per step so
  that a long prompt does not stall the others.
- The running requests hold slots 0..n-1 (one that finishes swaps places with the last), so a decode step reads
  a view of the first n rows and of as many of their first columns as the longest sequence holds: attention
  costs what the sequences hold, not the cache's length. On the fast path n and the columns are rounded up to
  buckets (1, 2, 4, 8, ... rows; 64, 96, 128, ... columns) and each bucket is compiled once (a CUDA graph on a
  GPU), as nano-vllm captures one graph per batch size.
- A free slot keeps what it cached. A new request takes the free slot that shares the longest usable prefix with
  it and feeds only the rest, so a conversation sent again with one more turn costs only its new tokens. Pictures
  are compared by a hash of their pixels (every <image> token has the same id: ids alone would hand one user's
  picture to another), and the media-masking rule decides what stays valid (see `reusable`).
- Requests with the same prompt (an API request's n answers) share one prefill: the first prefills, the others
  copy its slot's keys/values into theirs and draw their first tokens from the same logits.
- Sampling runs on the device for the whole batch, per request (sampling.py): greedy, temperature, top-k, top-p,
  a logit bias; log-probabilities only for the rows that ask.
- Text comes out incrementally (Detokenizer): a few tokens are decoded per step, never the whole answer again. A
  stop string ends the answer at its first character wherever the tokens split it; text that could still begin
  one is held back until it cannot, so what came out is never taken back.

Read top-down: Sampling, Request, Output (the interface); Detokenizer; Slot and the prefix helpers; Sequence (the
engine's state of a request) and the stop-string helpers; Chunk and Runner (the model side: the cache, the compiled
steps); Engine (the scheduler: slots, prefix reuse, shared and chunked prefill, stopping).
"""
import enum
import hashlib
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch

import lora
import sampling
from mmgpt import MMGPT, KVCache, Step
from tokenizer import Tokenizer
from perceiver import media_index


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: int = 0              # 0: off
    top_p: float = 1.0          # 1.0: off
    greedy: bool = False        # the most likely token (also what temperature 0 means)
    seed: int | None = None     # None: a fresh one


class TokenLogprob(NamedTuple):
    """A generated token's log-probability, and the most likely ids at its position with theirs (most likely first)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Request:
    """A prompt (ids, and the pictures of its <image> tokens, each (3, H, W)) and how to answer it; the engine fills
    in the answer. Generation ends at EOS (not part of the answer), after max_tokens, or at one of the `stop`
    strings: the text ends before its first character, and the token that completed it is not part of the answer.
    logit_bias (id -> bias) is added to the logits that choose a token; top_logprobs: None asks for no
    log-probabilities, k for each token's and its position's k most likely. `shares`: a request submitted before
    this one with the same ids and pictures, whose prefill this one copies (while that one is still to prefill)."""
    ids: list[int]
    pictures: list[torch.Tensor] = field(default_factory=list)
    max_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_logprobs: int | None = None
    shares: "Request | None" = None
    # The answer
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)      # one per token, when top_logprobs is set
    finish_reason: str | None = None        # "stop", "length" or "cancelled"
    cached: int = 0                         # prompt tokens a slot already held (prefix reuse)
    cancelled: bool = False                 # set by Engine.cancel: the request ends at the engine's next step
    state: "Sequence | None" = field(default=None, repr=False)      # the engine's, from submit on


class Output(NamedTuple):
    request: Request
    text: str           # the text that came out in this step
    finished: bool
    logprobs: tuple[TokenLogprob, ...] = ()     # of the tokens that joined the answer in this step


class Detokenizer:
    """The text of a growing answer, a few tokens decoded at a time (as vLLM does it): decoding the ids since the
    last emitted piece, with the piece before them as context (sentencepiece drops a leading space, and a
    character may span several byte tokens), and emitting what is new once it ends with a whole character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.start, self.read = tokenizer, [], 0, 0

    def _new_text(self, ids) -> str:
        before = self.tokenizer.decode(ids[self.start:self.read])
        return self.tokenizer.decode(ids[self.start:])[len(before):]

    def peek(self, token: int) -> str:
        """The text `token` would add, including characters not yet complete (shown as U+FFFD)."""
        return self._new_text(self.ids + [token])

    def add(self, token: int) -> str:
        """Append `token`; return the text that is now complete (often "", for a byte of a longer character)."""
        self.ids.append(token)
        new = self._new_text(self.ids)
        if not new or new.endswith("\ufffd"):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """What is held back at the end (an incomplete character, as U+FFFD)."""
        new = self._new_text(self.ids)
        self.start = self.read = len(self.ids)
        return new


@dataclass(eq=False)
class Slot:
    """One row of the cache: the tokens whose keys/values it holds (from column 0) and their pictures' hashes."""
    index: int
    ids: list[int] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    request: Request | None = None
    used: int = -1      # the step at which it was last freed: free slots are reused least recently used first

    def truncate(self, n: int, image_id: int, per_picture: int):
        del self.ids[n:]
        del self.pictures[pictures_begun(self.ids, image_id, per_picture):]


def pictures_begun(ids: list[int], image_id: int, per_picture: int) -> int:
    """The pictures whose <image> positions begin within ids (a prefix-fusion picture fills per_picture of them,
    and a slot may hold part of one)."""
    return -(-ids.count(image_id) // per_picture)


def picture_key(pixels: torch.Tensor) -> str:
    return hashlib.blake2b(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def common_prefix(a: list, b: list) -> int:
    """The length of the longest common prefix (bisection over slice comparisons: list equality runs in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


class Status(enum.Enum):
    WAITING = "waiting"             # queued, no slot yet
    PREFILLING = "prefilling"       # in a slot, its prompt going in
    DECODING = "decoding"           # its prompt in: a token to feed at every step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """The engine's state of one request (Request.state), from submit to its end."""
    keys: list[str]                 # its pictures' hashes: prefix reuse compares pictures by them
    index: torch.Tensor             # each prompt token's picture (perceiver.media_index)
    seed: int
    greedy: bool
    detok: Detokenizer
    bias: torch.Tensor | None = None        # logit_bias as a row of the vocabulary, on the device
    status: Status = Status.WAITING
    slot: Slot | None = None
    first: int = 0                          # the first picture its slot lacks
    inputs: torch.Tensor | None = None      # prefix fusion: the decoder inputs of those pictures
    next: int | None = None                 # the token to feed at the next decode step
    held: str = ""                          # text not yet out: it could still begin a stop string


def copies_prefill(request: Request) -> bool:
    """Whether the request waits for the one it shares its prompt with to prefill (and then copies that)."""
    source = request.shares
    return source is not None and source.state.status in (Status.WAITING, Status.PREFILLING)


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in text begins (None: none does)."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many of text's last characters could begin a stop string (a tail that is the start of one)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


# ----------------------------------------------------------------------------------------------------------------
# The engine

def _decode_step(model, step: Step, ids, rows, index):
    """What a decode step runs (compiled on the fast path): a token per slot 0..B-1."""
    return model.decode(ids, step, rows, index)[:, 0]


def _prefill_step(model, step: Step, ids, rows, index, last, inputs=None):
    """What a prefill chunk runs (compiled on the fast path): one slot, padded."""
    return model.decode(ids, step, rows, index, last, inputs)[:, 0]


class Chunk(NamedTuple):
    """A piece of one slot's prompt for Runner.prefill: ids going into the slot's columns start.., index their
    pictures among the slot's `pictures` (perceiver.media_index); prefix fusion (no cross-attention: `pictures` 0):
    inputs at their <image> positions instead (None: none in this piece)."""
    slot: int
    ids: list[int]
    start: int
    index: list[int]
    pictures: int
    inputs: torch.Tensor | None = None


class Runner:
    """The model side of the engine (nano-vllm's model runner): the cache, the steps that run the model over it
    (compiled on the fast path), picture encoding and sampling. It knows slots by their index; which request is in
    which slot, and what a slot holds, is the Engine's."""

    def __init__(self, model: MMGPT, slots: int, max_len: int, max_pictures: int, prefill_tokens: int,
                 banned: list[int], fast: bool, backend: str):
        self.model, self.cfg, self.max_len, self.fast = model, model.cfg, max_len, fast
        self.device, dtype = model.rope_cos.device, model.activation_dtype()
        self.cache = KVCache(model.cfg, slots, max_len, max_pictures, dtype, self.device)
        self.banned = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self.banned[banned] = True
        # The fast path's shapes come in buckets, so that its compiled code sees few (see bucket): batch 1, 2, 4, ...
        # (and the slot count); widths read 64, 96, 128, 192, 256, ... (x 1.5, x 4/3: attention reads at most half
        # again what the sequences hold) and the whole row; prefill lengths 16, 32, ... up to prefill_tokens;
        # pictures 1, 2, 4, ...
        self.buckets = sorted({min(2 ** i, slots) for i in range(slots.bit_length() + 1)})
        self.widths = sorted({min(w, max_len + 1) for i in range(6, (max_len + 1).bit_length() + 1)
                              for w in (2 ** i, 3 * 2 ** (i - 1))})
        self.lengths = tuple(n for n in (16, 32, 64, 128, 256, 512, 1024, 2048) if n < prefill_tokens) + \
            (prefill_tokens,)
        self.pictures = sorted({min(2 ** i, max_pictures) for i in range(max_pictures.bit_length() + 1)})
        self.decode_step, self.prefill_step = _decode_step, _prefill_step
        self.greedy, self.sample, self.logprobs = sampling.greedy, sampling.sample, sampling.logprobs
        if fast:
            self._compile(backend)

    def _compile(self, backend: str):
        lora.merge(self.model)
        # Shapes come in buckets; the second size a dimension takes makes it symbolic (torch.compile's automatic
        # dynamic shapes), so each step compiles a few times, not once per (batch, width) bucket: with the pictures'
        # variants that would be dozens of compiles of the whole decoder. CUDA graphs are still recorded per bucket
        # (cheap). Dynamo's default of 8 graphs per function is too few all the same (see allow_recompiles).
        options = dict(backend=backend, fullgraph=True)
        cuda_graphs = "reduce-overhead" if self.device.type == "cuda" else None
        self.decode_step = torch.compile(_decode_step, mode=cuda_graphs, **options)
        self.prefill_step = torch.compile(_prefill_step, **options)
        self.greedy = torch.compile(sampling.greedy, **options)
        self.sample = torch.compile(sampling.sample, **options)
        # The ViT only: inductor's attention-fusion pass fails on the perceiver's 5-d attention (torch 2.14).
        self.model.vision.compile(**options)

    def allow_recompiles(self):
        """On the fast path, before a step, in the thread that runs it: up to 64 graphs per compiled function, not
        Dynamo's 8 (past which a step fails). Dynamo's settings are per thread (torch 2.14: a thread starts from the
        defaults), and the thread that steps an engine need not be the one that made it (serve.py's loop)."""
        if self.fast and torch._dynamo.config.recompile_limit < 64:
            torch._dynamo.config.recompile_limit = 64

    def tensor(self, rows) -> torch.Tensor:
        """Small per-step inputs go to the device in one copy."""
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def bucket(self, sizes, n: int) -> int:
        """The size a step runs at for n (rows, columns, prompt tokens, pictures): on the fast path the smallest of
        `sizes` that holds n; eagerly n itself (no compiled code to spare, so no padding to pay for)."""
        return next(s for s in sizes if s >= n) if self.fast else n

    def width(self, n: int) -> int:
        """The columns a step reads: at least the first n."""
        return self.bucket(self.widths, n)

    def picture_keys(self, n: int) -> int:
        """The pictures' keys a step reads: those of at least the first n pictures."""
        return self.bucket(self.pictures, n) * self.cfg.perceiver_latents

    def copy(self, sources: list[int], targets: list[int], columns: int, pictures: int):
        """Slot targets[i] takes the keys/values of slot sources[i] (read before any is written): their first
        `columns` columns and `pictures` pictures (what they hold; the rest is never read before it is written)."""
        n, c = pictures * self.cfg.perceiver_latents, self.cache
        for t, width in ((c.k, columns), (c.v, columns), (c.picture_k, n), (c.picture_v, n)):
            t[:, targets, :, :width] = t[:, sources, :, :width]

    def pixels(self, groups: list[list[torch.Tensor]]) -> torch.Tensor:
        """Several requests' pictures (3, H, W), in order, as one batch (1, N, 3, H, W) on the device: one pass of
        the ViT and perceiver encodes each picture on its own, whatever is beside it."""
        return torch.stack([p for pictures in groups for p in pictures])[None].to(self.device)

    def add_pictures(self, todo: list[tuple[int, int, list[torch.Tensor]]]):
        """Encode the pictures of several slots in one pass and keep their cross-attention keys/values: todo[i] =
        (slot, first, pictures), the slot's pictures first, first + 1, ..."""
        kv = self.model.picture_kv(self.model.encode_images(self.pixels([pictures for _, _, pictures in todo])))
        n, done = self.cfg.perceiver_latents, 0
        for slot, first, pictures in todo:
            source, target = (slice(i * n, (i + len(pictures)) * n) for i in (done, first))
            for i, (k, v) in kv.items():
                j = self.cache.xattn[i]
                self.cache.picture_k[j, slot, :, target] = k[0, :, source]
                self.cache.picture_v[j, slot, :, target] = v[0, :, source]
            done += len(pictures)

    def picture_inputs(self, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Prefix fusion: the decoder's inputs of each group of pictures, (pictures * latents, dim) in order, all
        encoded in one pass."""
        pixels = self.pixels(groups)
        ids = torch.full((1, pixels.shape[1] * self.cfg.picture_tokens), self.cfg.image_id, device=self.device)
        inputs = self.model.picture_inputs(pixels, ids)
        return list(inputs.split([len(pictures) * self.cfg.picture_tokens for pictures in groups]))

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Feed a chunk of prompt into each of several slots, in one forward; logits (len(chunks), vocab) after each
        chunk's last token. The chunks are padded to the longest (on the fast path, up to a length bucket): the
        padding goes to each slot's scratch column, after its real tokens, which never see it."""
        n, T = len(chunks), self.bucket(self.lengths, max(len(c.ids) for c in chunks))

        def padded(values: list[int], pad: int) -> list[int]:
            return values + [pad] * (T - len(values))

        # A row per chunk, in one copy: its ids, columns and pictures' index (each T long), its slot, the place of
        # its last token and how many pictures its slot holds.
        x = self.tensor([padded(c.ids, 0) + padded(list(range(c.start, c.start + len(c.ids))), self.max_len)
                         + padded(c.index, 0) + [c.slot, len(c.ids) - 1, c.pictures] for c in chunks])
        ids, columns, index = x[:, :3 * T].view(n, 3, T).unbind(1)
        slots, last, pictures = x[:, 3 * T:].unbind(1)
        most = max(c.pictures for c in chunks)
        step = Step(self.cache, slots, slots[:, None], columns, self.width(max(c.start + len(c.ids) for c in chunks)),
                    gather=True, picture_keys=self.picture_keys(most))
        inputs = [c.inputs for c in chunks if c.inputs is not None]
        if inputs:      # prefix fusion (rows without <image> in their chunk have none: masked_scatter skips them)
            return self.prefill_step(self.model, step, ids, None, None, last, torch.cat(inputs))
        # No token of the chunks sees a picture (by the default rule, a round after the last one): eagerly, the
        # blocks run their FFW only, as a decode step's do, with no product for rows the attention would zero. The
        # fast path keeps the one graph it compiled at warm_up for both (its products are cheap on a GPU).
        seen = most and (self.fast or any(any(c.index) for c in chunks))
        return self.prefill_step(self.model, step, ids, pictures.bool() if most else None, index if seen else None,
                                 last)

    def decode(self, rows: list) -> torch.Tensor:
        """One token for each decoding slot, in one forward over slots 0..B-1 (B: len(rows); on the fast path its
        bucket): rows[i] = (token, column, pictures in the slot) for slot i, or None for a slot that decodes nothing
        (its row writes to the scratch column). A new token sees no picture by the default masking rule (only the
        cross-attention blocks' FFW runs), the slot's last one under attend_previous. Logits (B, vocab)."""
        B = self.bucket(self.buckets, len(rows))
        rows = rows + [None] * (B - len(rows))
        live = [r for r in rows if r is not None]
        table = [r or (0, self.max_len, 0) for r in rows]
        ids, columns, pictures = self.tensor([list(col) for col in zip(*table)])
        most = max(r[2] for r in live)
        if self.fast and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()   # the previous step's outputs are no longer used
        slots = torch.arange(B, device=self.device)
        step = Step(self.cache, slots, slots[:, None], columns[:, None], self.width(max(r[1] for r in live) + 1),
                    gather=False, picture_keys=self.picture_keys(most))
        index = pictures[:, None] if most and self.cfg.attend_previous else None
        return self.decode_step(self.model, step, ids[:, None], pictures.bool() if most else None, index)

    def choose(self, logits: torch.Tensor, rows: list) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each logits row's request (a row whose request is None decodes nothing), and its
        log-probabilities where the request asks for them. The logits are the model's; a bias is added to choose."""
        live = [r for r in rows if r is not None]
        chosen = logits
        if any(r.state.bias is not None for r in live):
            zero = torch.zeros_like(self.banned, dtype=torch.float)
            bias = [zero if r is None or r.state.bias is None else r.state.bias for r in rows]
            chosen = logits.float() + torch.stack(bias + [zero] * (len(logits) - len(rows)))
        if all(r.state.greedy for r in live):
            tokens = self.greedy(chosen, self.banned)
        else:
            s = [Sampling() if r is None else r.sampling for r in rows]
            p = torch.tensor([[x.temperature if x.temperature > 0 else 1.0 for x in s], [x.top_p for x in s]],
                             dtype=torch.float).to(self.device, non_blocking=True)
            q = self.tensor([[x.top_k if x.top_k > 0 else logits.shape[-1] for x in s],
                             [r is None or r.state.greedy for r in rows],
                             [0 if r is None else r.state.seed for r in rows],
                             [0 if r is None else len(r.tokens) for r in rows]])
            tokens = self.sample(chosen, self.banned, p[0], q[0], p[1], q[1].bool(), q[2], q[3])
        top = [r.top_logprobs for r in live if r.top_logprobs is not None]
        if not top:      # the common case costs nothing more
            return tokens.tolist(), [None] * len(rows)
        chosen, ids, values = (t.tolist() for t in self.logprobs(logits, self.banned, tokens, max(top)))
        tokens = tokens.tolist()
        return tokens, [None if r is None or r.top_logprobs is None else
                        TokenLogprob(tokens[i], chosen[i], list(zip(ids[i], values[i]))[:r.top_logprobs])
                        for i, r in enumerate(rows)]


class Engine:
    """Decodes requests in `slots` cache rows of max_len tokens (default: the model's context), each holding up
    to max_pictures pictures: the scheduler (requests, slots, prefix reuse, stopping) over a Runner (the model).
    eos_id ends an answer (default the tokenizer's </s>); `banned` ids are never generated (default
    tokenizer.never_generate). fast: the fast path -- LoRA merged into the weights (the model is for decoding from
    then on), the decode step (CUDA graphs on a GPU), the prefill and the ViT compiled, their shapes in buckets (a
    batch runs at 1, 2, 4, ... rows, a chunk padded up to a length bucket). Without it everything runs eagerly, on
    exact shapes."""

    def __init__(self, model: MMGPT, tokenizer: Tokenizer, slots: int = 1, max_len: int | None = None, *,
                 max_pictures: int = 16, prefill_tokens: int = 512, fast: bool = False, eos_id: int | None = None,
                 banned: list[int] | None = None, backend: str = "inductor"):
        self.tokenizer, self.cfg = tokenizer, model.cfg
        self.max_len = max_len or model.cfg.max_seq_len
        if not 0 < self.max_len <= model.cfg.max_seq_len:
            raise ValueError(f"max_len {self.max_len}: the model's context holds {model.cfg.max_seq_len} tokens")
        self.max_pictures, self.prefill_tokens = max_pictures, prefill_tokens
        self.eos_id = tokenizer.eos_id if eos_id is None else eos_id
        self.runner = Runner(model, slots, self.max_len, max_pictures, prefill_tokens,
                             tokenizer.never_generate if banned is None else banned, fast, backend)
        self.slots = [Slot(i) for i in range(slots)]
        self.running = 0                # slots 0..running-1 hold requests
        self.waiting: deque[Request] = deque()
        self.clock = 0

    # -- the interface --------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (it starts at a coming step). Raises ValueError when it cannot be run at all."""
        n, pictures = len(request.ids), len(request.pictures)
        if request.tokens or request.finish_reason:
            raise ValueError("a request runs once: make a new one")
        if n == 0 or request.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        if n + request.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({n} tokens) and max_tokens ({request.max_tokens}) pass the context of "
                             f"{self.max_len} tokens")
        per = self.cfg.picture_tokens
        if request.ids.count(self.cfg.image_id) != pictures * per:
            raise ValueError(f"{request.ids.count(self.cfg.image_id)} <image> tokens but {pictures} pictures"
                             + (f" ({per} tokens each)" if per > 1 else ""))
        if pictures > self.max_pictures:
            raise ValueError(f"{pictures} pictures: a slot holds at most {self.max_pictures}")
        keys = [picture_key(p) for p in request.pictures]
        source = request.shares
        if source is not None and (source.state is None or source.ids != request.ids or source.state.keys != keys):
            raise ValueError("a request shares the prompt of one submitted before it, with the same ids and pictures")
        bias = None
        if request.logit_bias:
            if not all(0 <= i < self.cfg.vocab_size for i in request.logit_bias):
                raise ValueError(f"logit_bias names ids outside the vocabulary (0..{self.cfg.vocab_size - 1})")
            bias = torch.zeros(self.cfg.vocab_size)
            bias[list(request.logit_bias)] = torch.tensor(list(request.logit_bias.values()), dtype=torch.float)
            bias = bias.to(self.runner.device)
        s = request.sampling
        request.state = Sequence(
            keys, media_index(torch.tensor([request.ids]), self.cfg.image_id, self.cfg.attend_previous)[0],
            seed=random.getrandbits(32) if s.seed is None else (s.seed ^ (s.seed >> 32)) & sampling.MASK32,
            greedy=s.greedy or s.temperature <= 0, detok=Detokenizer(self.tokenizer), bias=bias)
        self.waiting.append(request)
        return request

    def warm_up(self):
        """The fast path's compiling done now, not while requests wait (serve.py calls it before it serves): made-up
        requests in waves of one, two and every slot, with pictures and without, prompts of two lengths, greedy and
        sampled, each run to its max_tokens. The shapes traffic brings later reuse what they compiled: a dimension
        that has taken two sizes is symbolic from then on. The slots hold nothing after. Eagerly: nothing to do."""
        if not self.runner.fast:
            return
        if self.busy:
            raise RuntimeError("warm_up runs before any request")
        picture = torch.zeros(3, *self.runner.model.vision.visual.image_size)
        word = self.tokenizer.encode(" a", bos=False)[-1:]

        def wave(rows: int, pictures: bool, sampled: bool, long: bool) -> list[Request]:
            """rows requests alike: short (prefill length 16, width 64) with a picture, or long (128; 96) with two"""
            n = min(1 + long, self.max_pictures) if pictures else 0
            ids = self.tokenizer.encode("<image>" * n)
            ids += word * min(80 if long else 8, self.max_len - 4 - len(ids))
            return [Request(ids, [picture] * n, 3, Sampling(seed=i) if sampled else Sampling(greedy=True))
                    for i in range(rows)]

        # Every kind of step (one row, several, every slot; with pictures or without; greedy or sampled) meets each
        # dimension at two sizes: a kind compiled before a dimension went symbolic would compile again for it.
        sizes = sorted({1, min(2, len(self.slots)), len(self.slots)})
        kinds = [(rows, pictures, False) for rows in sizes for pictures in (False, True)] + \
            [(rows, False, True) for rows in sizes[:2]]
        eos, self.eos_id = self.eos_id, -1         # every made-up answer runs to its max_tokens
        try:
            for kind in kinds:
                for long in (False, True):
                    self.generate(wave(*kind, long))
                    self.reset()    # each wave on empty slots: the next reuses nothing (its whole prompt is fed)
        finally:
            self.eos_id = eos

    def cancel(self, request: Request):
        """Stop a request at the next step (from any thread, also before it is submitted: it only sets a flag); its
        slot is freed there."""
        request.cancelled = True

    def reset(self):
        """Forget every request and what every slot holds (after a step failed half-way)."""
        self.waiting.clear()
        for slot in self.slots:
            slot.ids, slot.pictures, slot.request = [], [], None
        self.running = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, requests: Iterable[Request], on_finish: Callable[[Request], None] | None = None
                 ) -> list[Request]:
        """Run requests to their end; they are returned in the order given. They are taken from the iterable as
        slots free up, so a lazy one (pictures decoded while the model works) is read as the engine goes."""
        todo, taken, more = iter(requests), [], True
        while True:
            while more and self.running + len(self.waiting) < len(self.slots):
                request = next(todo, None)
                if request is None:
                    more = False
                else:
                    taken.append(self.submit(request))
            if not self.busy:
                return taken
            for out in self.step():
                if out.finished and on_finish:
                    on_finish(out.request)

    @torch.no_grad()
    def step(self) -> list[Output]:
        """Cancel what was cancelled, admit waiting requests into free slots, prefill (within the token budget),
        then decode one token for every request that had its prompt in already. Returns what each request produced."""
        self.clock += 1
        self.runner.allow_recompiles()
        outputs = [self._finish(r, "cancelled") for r in self._requests() if r.cancelled]
        admitted = []
        while self.waiting and self.running < len(self.slots):
            admitted.append(self._admit(self.waiting.popleft()))
        self._encode(admitted)
        # Those with a token to feed decode; one whose prompt is finished in this step has its first token out now
        # and decodes from the next step on (its first token does not wait for a decode step).
        ready = [s.request for s in self.slots[:self.running] if s.request.state.status == Status.DECODING]
        self._prefill(outputs)
        if ready:
            self._decode(ready, outputs)
        return outputs

    def _requests(self) -> list[Request]:
        return list(self.waiting) + [s.request for s in self.slots[:self.running]]

    # -- slots ------------------------------------------------------------------------------------------------------
    def reusable(self, slot: Slot, request: Request) -> int:
        """How many of the slot's cached tokens the request can keep: the common prefix (pictures compared by
        hash), less what the media-masking rule changes. A slot's keys/values equal a full forward over its ids
        with its pictures, where a token's picture depends on the pictures around it (perceiver.media_index) and
        a sequence without pictures skips the cross-attention blocks altogether. So:
        - default rule (a token sees the picture that FOLLOWS it): the tokens after the last common picture stay
          only if the next picture is the same in both (or neither has one);
        - attend_previous (the picture before it): the prefix stays if both have pictures or neither does.
        - prefix fusion: nothing (no token sees a picture but through the positions it fills, which come before it).
        At least one prompt token is always fed (its logits give the first answer token)."""
        image_id, per, keys = self.cfg.image_id, self.cfg.picture_tokens, request.state.keys
        n = common_prefix(slot.ids, request.ids[:-1])
        shared = pictures_begun(slot.ids[:n], image_id, per)
        same = common_prefix(slot.pictures[:shared], keys)
        if same < shared:                     # a different picture: keep what comes before it
            n = [i for i, t in enumerate(slot.ids) if t == image_id][same * per]
            shared = same
        if per > 1:
            return n
        if self.cfg.attend_previous:
            return n if bool(slot.pictures) == bool(keys) else 0
        nxt = [k[shared] if len(k) > shared else None for k in (slot.pictures, keys)]
        if nxt[0] != nxt[1]:
            n = max((i + 1 for i in range(n) if slot.ids[i] == image_id), default=0)
        return n

    def _swap(self, i: int, j: int):
        """Exchange slots i and j: their keys/values and what they hold."""
        if i == j:
            return
        a, b = self.slots[i], self.slots[j]
        # What each holds: its tokens, and its pictures (a request being prefilled has all of its own already)
        pictures = [len(s.request.pictures) if s.request else len(s.pictures) for s in (a, b)]
        self.runner.copy([i, j], [j, i], max(len(a.ids), len(b.ids)), max(pictures))
        self.slots[i], self.slots[j], a.index, b.index = b, a, j, i

    def _admit(self, request: Request) -> Request:
        """Into the free slot with the longest usable prefix (then the least recently used), moved to the end of
        the running ones; the pictures it does not hold are encoded by _encode."""
        slot = max(self.slots[self.running:], key=lambda s: (self.reusable(s, request), -s.used))
        keep = self.reusable(slot, request)
        self._swap(slot.index, self.running)
        self.running += 1
        slot.truncate(keep, self.cfg.image_id, self.cfg.picture_tokens)
        state = request.state
        slot.request, state.slot, state.status, request.cached = request, slot, Status.PREFILLING, keep
        state.first = slot.ids.count(self.cfg.image_id) // self.cfg.picture_tokens     # the pictures wholly held
        return request

    def _encode(self, admitted: list[Request]):
        """The pictures that the admitted requests' slots do not hold, all encoded in one pass: into the slots'
        picture buffers past what they hold (their prefills count them in), or for prefix fusion into the inputs
        their prefills place. A request that copies another's prefill needs none of its own."""
        todo = [r for r in admitted if r.pictures[r.state.first:] and not copies_prefill(r)]
        if not todo:
            return
        if self.cfg.picture_tokens > 1:
            for r, inputs in zip(todo, self.runner.picture_inputs([r.pictures[r.state.first:] for r in todo])):
                r.state.inputs = inputs
        else:
            self.runner.add_pictures([(r.state.slot.index, r.state.first, r.pictures[r.state.first:]) for r in todo])

    def _finish(self, request: Request, reason: str, text: str | None = None) -> Output:
        """End a request; what it had not let out comes out now (text: in place of that, at a stop string)."""
        state = request.state
        if text is None:
            text = state.held + state.detok.flush()
            at = stop_at(text, request.stop)        # (an incomplete character let out last)
            text = text if at is None else text[:at]
        request.finish_reason, request.text, state.held = reason, request.text + text, ""
        before, slot = state.status, state.slot
        state.status = Status.FINISHED
        if before == Status.WAITING:
            self.waiting.remove(request)
        else:
            slot.request, slot.used, state.slot = None, self.clock, None
            self.running -= 1
            self._swap(slot.index, self.running)
        if before in (Status.WAITING, Status.PREFILLING):  # those admitted to copy its prefill prefill themselves
            orphans = [s.request for s in self.slots[:self.running] if s.request.shares is request]
            for r in orphans:
                r.state.slot.truncate(0, self.cfg.image_id, self.cfg.picture_tokens)
                r.state.first, r.cached = 0, 0
            self._encode(orphans)
        return Output(request, text, True)

    # -- feeding the runner ----------------------------------------------------------------------------------------
    def _cross_attended(self, request: Request) -> int:
        """The pictures a step feeds cross-attention for the request: none for a model without it (prefix fusion)."""
        return len(request.pictures) if self.cfg.xattn_layers else 0

    def _prefill(self, outputs: list):
        """Feed the next chunk of prompt of the requests that do not have theirs in yet, in one forward for as many
        of them (in slot order) as the token budget holds: each chunk at most prefill_tokens, and the chunks padded
        to the longest, so that rows x longest stays within it. After a request's last chunk, choose its first
        token, and that of each request waiting to copy its prefill."""
        image_id, per = self.cfg.image_id, self.cfg.picture_tokens
        todo, longest = [], 0
        for slot in self.slots[:self.running]:
            request = slot.request
            if request.state.status != Status.PREFILLING or copies_prefill(request):
                continue
            size = min(len(request.ids) - len(slot.ids), self.prefill_tokens)
            if todo and (len(todo) + 1) * max(longest, size) > self.prefill_tokens:
                break
            todo.append(slot)
            longest = max(longest, size)
        if not todo:
            return
        chunks = []
        for slot in todo:
            state, start = slot.request.state, len(slot.ids)
            chunk = slot.request.ids[start:start + longest]
            inputs = None
            if state.inputs is not None and image_id in chunk:     # prefix fusion: the inputs at its <image>s
                done = slot.ids.count(image_id) - state.first * per
                inputs = state.inputs[done:done + chunk.count(image_id)]
            chunks.append(Chunk(slot.index, chunk, start, state.index[start:start + len(chunk)].tolist(),
                                self._cross_attended(slot.request), inputs))
        logits = self.runner.prefill(chunks)
        for slot, c in zip(todo, chunks):
            slot.ids += c.ids  # first: a slot that lacks the hash of one of its pictures reuses nothing past it
            slot.pictures = slot.request.state.keys[:pictures_begun(slot.ids, image_id, per)]
        rows, requests = [], []      # the prompts now in, and the requests that copy them (each its source's row)
        for i, slot in enumerate(todo):
            if len(slot.ids) == len(slot.request.ids):
                for r in (slot.request, *self._copy_prefill(slot)):
                    rows.append(i)
                    requests.append(r)
        if rows:
            self._choose(logits[rows], requests, outputs)

    def _copy_prefill(self, source: Slot) -> list[Request]:
        """The requests admitted to copy the prompt the source slot has just prefilled: they take its keys/values."""
        copies = [s.request for s in self.slots[:self.running] if s.request.shares is source.request
                  and s.request.state.status == Status.PREFILLING]
        if copies:
            self.runner.copy([source.index] * len(copies), [r.state.slot.index for r in copies], len(source.ids),
                             self._cross_attended(source.request))
            for r in copies:
                r.state.slot.ids, r.state.slot.pictures = list(source.ids), list(source.pictures)
                r.cached = source.request.cached
        return copies

    def _decode(self, ready: list[Request], outputs: list):
        """One token for each of the ready requests (running, their prompts in)."""
        rows = [None] * self.running
        for r in ready:
            rows[r.state.slot.index] = (r.state.next, len(r.state.slot.ids), self._cross_attended(r))
        logits = self.runner.decode(rows)
        requests = [None if row is None else self.slots[i].request for i, row in enumerate(rows)]
        for r in requests:     # their tokens are in the cache now
            if r is not None:
                r.state.slot.ids.append(r.state.next)
        self._choose(logits, requests + [None] * (len(logits) - len(requests)), outputs)

    def _choose(self, logits: torch.Tensor, rows: list, outputs: list):
        tokens, logprobs = self.runner.choose(logits, rows)
        for r, token, logprob in zip(rows, tokens, logprobs):
            if r is not None:
                outputs.append(self._accept(r, token, logprob))

    def _accept(self, request: Request, token: int, logprob: TokenLogprob | None) -> Output:
        """The stop conditions for a sampled token; else it joins the answer (and is fed at the next step). Its
        text comes out but for a tail that could begin a stop string."""
        state = request.state
        state.next, state.status = None, Status.DECODING
        if token == self.eos_id:
            return self._finish(request, "stop")
        if request.stop:
            unsent = state.held + state.detok.peek(token)
            at = stop_at(unsent, request.stop)
            if at is not None:
                return self._finish(request, "stop", unsent[:at])
        request.tokens.append(token)
        logprobs = () if logprob is None else (logprob,)
        request.logprobs += logprobs
        unsent = state.held + state.detok.add(token)
        keep = held_back(unsent, request.stop)
        text, state.held = unsent[:len(unsent) - keep], unsent[len(unsent) - keep:]
        request.text += text
        if len(request.tokens) == request.max_tokens:
            out = self._finish(request, "length")
            return Output(request, text + out.text, True, logprobs)
        state.next = token
        return Output(request, text, False, logprobs)
