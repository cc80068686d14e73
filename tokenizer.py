"""Text to ids and back as MultiModal-GPT's LlamaTokenizer (transformers 4.28) does it: sentencepiece + the 3 tokens
MultiModal-GPT adds."""
import re

import sentencepiece as spm


class Tokenizer:
    """sentencepiece + the 3 tokens MultiModal-GPT adds, giving the ids of its LlamaTokenizer (transformers 4.28).

    The text is cut at special strings; whitespace next to the 3 added tokens is stripped on both sides (they
    were added as plain strings, which HF strips) but not next to <s>, </s>, <unk> (AddedTokens without strip);
    every remaining piece is encoded by sentencepiece on its own, so each gets its own dummy-prefix space.
    """
    ADDED = ("<|endofchunk|>", "<image>", "<PAD>")

    def __init__(self, model: str | bytes):
        """model: a tokenizer.model file, or its bytes (a convert.py file holds them)."""
        self.sp = spm.SentencePieceProcessor(**{"model_proto" if isinstance(model, bytes) else "model_file": model})
        n = self.sp.vocab_size()
        self.eoc_id, self.image_id, self.pad_id = n, n + 1, n + 2
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.vocab_size = n + 3
        self.picture_tokens = 1     # <image> ids written per <image> (a prefix-fusion model's picture_tokens)
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
            ids += [self.special[p]] * (self.picture_tokens if p == "<image>" else 1) if p in self.special \
                else self.sp.encode(p)
        return ids + ([self.eos_id] if eos else [])

    def encode_spans(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode() plus the character span (start, end) of text that each id came from (BOS: (0, 0))."""
        ids, spans = ([self.bos_id], [(0, 0)]) if bos else ([], [])
        pos = 0
        for p in self._pieces(text):
            start = text.index(p, pos)
            pos = start + len(p)
            if p in self.special:
                n = self.picture_tokens if p == "<image>" else 1
                ids += [self.special[p]] * n
                spans += [(start, pos)] * n
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
