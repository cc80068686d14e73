"""The next token of every row of a batch, on the device (the engine's Runner compiles these on the fast path).

    greedy(logits, banned)                            the most likely token of each row
    sample(logits, banned, temperature, ...)          a draw per row: temperature, top-k, top-p, its own seed
    logprobs(logits, tokens, top)                     the chosen tokens' log-probabilities and the top alternatives

A draw's noise is a hash of (seed, token number, vocabulary id), so a seeded request draws the same tokens alone or
in any batch. Log-probabilities are the model's own (log-softmax of its logits, before the bias, temperature, top-k
and top-p that choose the token), as vLLM reports them by default.
"""
import torch

MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply), in int64 without overflow: values stay below 2^32 and the
    multiplier below 2^31."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise (B, vocab) that depends only on each row's (seed, step) and the vocabulary id: argmax(logits +
    noise) draws from softmax(logits), and draws the same whatever else is in the batch."""
    ids = torch.arange(vocab, device=seeds.device)
    h = _mix(_mix(_mix(seeds[:, None]) ^ steps[:, None]) ^ ids)
    u = ((h >> 8).float() + 0.5) / 2**24              # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def greedy(logits: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(banned, -float("inf")).argmax(-1)


def sample(logits: torch.Tensor, banned: torch.Tensor, temperature, top_k, top_p, is_greedy, seeds, steps):
    """The next token of each row (B, vocab) -> (B,): banned ids never; the greedy rows their most likely token;
    the others a draw from softmax(logits / temperature) kept to the top_k most likely and then to the smallest
    set whose probability reaches top_p (HF's order). Per-row parameters are (B,) tensors; top_k = vocab is off."""
    logits = logits.float().masked_fill(banned, -float("inf"))
    scaled = logits / temperature[:, None]
    ordered = scaled.sort(-1, descending=True).values
    rank = torch.arange(logits.shape[-1], device=logits.device)
    ordered = ordered.masked_fill(rank >= top_k[:, None], -float("inf"))
    probs = ordered.softmax(-1)
    keep = (rank < top_k[:, None]) & (probs.cumsum(-1) - probs < top_p[:, None])
    threshold = ordered.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)    # the least likely kept
    drawn = (scaled.masked_fill(scaled < threshold, -float("inf")) + gumbel_noise(seeds, steps, logits.shape[-1]))
    return torch.where(is_greedy, logits.argmax(-1), drawn.argmax(-1))


def logprobs(logits: torch.Tensor, banned: torch.Tensor, tokens: torch.Tensor, top: int):
    """Each row's chosen token's log-probability (B,), and the `top` most likely ids that can be generated (banned
    ones are not) and their log-probabilities (B, top), most likely first."""
    logp = logits.float().log_softmax(-1)
    best = logp.masked_fill(banned, -float("inf")).topk(top, -1)
    return logp.gather(-1, tokens[:, None])[:, 0], best.indices, best.values
