"""Tokenizer: the ids MultiModal-GPT's LlamaTokenizer (transformers 4.28, slow) gives, on a model trained here."""
import pytest


def sp(tokenizer, text):
    return tokenizer.sp.encode(text)


def test_added_token_ids(tokenizer):
    n = tokenizer.sp.vocab_size()
    assert (tokenizer.eoc_id, tokenizer.image_id, tokenizer.pad_id) == (n, n + 1, n + 2)
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == n + 3


def test_reference_examples(tokenizer):
    image = tokenizer.image_id
    expected = [1] + sp(tokenizer, "a") + [image] + sp(tokenizer, "b")
    assert tokenizer.encode("a <image> b") == expected
    assert tokenizer.encode("a\n<image>\nb") == expected
    # No stripping next to </s>: "a " and " b" keep their spaces (and each gets its dummy prefix).
    ids = tokenizer.encode("a </s> b")
    assert [tokenizer.sp.id_to_piece(i) for i in ids[1:3]] == ["▁a", "▁"]
    assert ids == [1] + sp(tokenizer, "a ") + [2] + sp(tokenizer, " b")
    assert ids[3] == 2 and tokenizer.sp.id_to_piece(ids[4]) == "▁"
    assert tokenizer.encode("That is all. Fine.</s>")[-1] == 2


@pytest.mark.parametrize("text, chunks", [
    ("<image><image> two", ["<image>", "<image>", "two"]),
    ("a<|endofchunk|>b", ["a", "<|endofchunk|>", "b"]),
    ("x <PAD>   <image>\n\n y", ["x", "<PAD>", "<image>", "y"]),
    ("<s>hello</s>", ["<s>", "hello", "</s>"]),
    ("a <s> b", ["a ", "<s>", " b"]),
    ("q\n\n</s>\n\n### Instruction:", ["q\n\n", "</s>", "\n\n### Instruction:"]),
    ("<unk> x", ["<unk>", " x"]),
    ("   ", ["   "]),
    ("", []),
])
def test_special_splitting_and_stripping(tokenizer, text, chunks):
    expected = [1]
    for c in chunks:
        expected += [tokenizer.special[c]] if c in tokenizer.special else sp(tokenizer, c)
    assert tokenizer.encode(text) == expected


@pytest.mark.parametrize("text", [
    "naïve café — 東京 😀 ünïcödé",
    "12345 + 678 = 7023",
    "spaces    between   words",
    "lines\n\n\nand\ttabs\r\n",
    "  leading and trailing  ",
])
def test_plain_text_is_one_sentencepiece_chunk(tokenizer, text):
    assert tokenizer.encode(text) == [1] + sp(tokenizer, text)
    assert tokenizer.encode(text, bos=False, eos=True) == sp(tokenizer, text) + [2]


def test_digits_are_split_and_unicode_falls_back_to_bytes(tokenizer):
    ids = tokenizer.encode("2024", bos=False)
    assert len(ids) == 5  # dummy prefix + one piece per digit (split_digits, as LLaMA)
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("東", bos=False)]
    assert pieces[-3:] == ["<0xE6>", "<0x9D>", "<0xB1>"]  # byte fallback, no <unk>


def test_decode_round_trip(tokenizer):
    for text in ["the cat sat on the mat", "naïve 東京 😀 12 34", "a<image>b</s>"]:
        assert tokenizer.decode(tokenizer.encode(text, bos=False)) == text


def test_spans_cover_the_text(tokenizer):
    text = "Q: naïve cat?\n<image>\nA: 東京 red.</s> done"
    ids, spans = tokenizer.encode_spans(text)
    assert ids == tokenizer.encode(text)
    assert text[spans[ids.index(tokenizer.image_id)][0]:spans[ids.index(tokenizer.image_id)][1]] == "<image>"
    assert text[slice(*spans[ids.index(2)])] == "</s>"
    # Concatenating the covered text of every id rebuilds the text minus the stripped whitespace.
    covered = "".join(text[a:b] for a, b in spans)
    assert covered == "Q: naïve cat?<image>A: 東京 red.</s> done"
