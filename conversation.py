"""A conversation on the paper's template, and a picture as the model reads it: what training (data.py), chat.py,
eval.py, the demo and the server all share, so that each renders a conversation exactly as the others do.

The template (paper, Tables 1 and 2), for a picture and two rounds:

    {HEADER}\\n\\n### Image:\\n<image>\\n\\n### Instruction:\\n{q1}\\n\\n### Response:\\n{a1}</s>\\n\\n###...

Language-only: the same without the `### Image:` block; a turn with an input adds `\\n\\n### Input:\\n{input}` after
its instruction. A conversation that brings in another picture later (chat.py's /image, a second image in a
request to serve.py) continues the same string with another `### Image:` block before the next instruction: it is
a list of parts, each a picture and the turns asked after it.
"""
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps


class DataError(ValueError):
    """Bad input: the message names the file, the record (index, line or id) and the field, or the picture."""


@dataclass
class Turn:
    question: str
    answer: str
    input: str = ""     # shown as "### Input:" after this turn's instruction when not empty


@dataclass
class Conversation:
    image: str | None                   # picture path (or any name for it), None for language-only
    turns: list[Turn]
    source: str = field(default="", compare=False)   # "kind:annotation file", for messages and counts


HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
EOS = "</s>"
IMAGE_BLOCK = "\n\n### Image:\n<image>"


def layout(parts: list[Conversation], open_last: bool = False, header: str = HEADER
           ) -> tuple[str, list[tuple[int, int]]]:
    """The template string of the parts (one header; each part's picture block, then its turns) and the character
    span of each written answer together with its </s>. With open_last (implied when the last answer is ""), the
    string ends with the last turn's "### Response:\\n": the prompt from which a model writes that answer. Every
    other answer is closed with </s>, also an empty one. A part may have no turns (two pictures in a row) unless
    it is the last."""
    if not parts or not parts[-1].turns:
        raise ValueError("a conversation needs at least one turn, after its last picture")
    open_last = open_last or parts[-1].turns[-1].answer == ""
    text, spans = header, []
    for k, part in enumerate(parts):
        text += IMAGE_BLOCK if part.image is not None else ""
        for i, t in enumerate(part.turns):
            text += f"\n\n### Instruction:\n{t.question}"
            if t.input:
                text += f"\n\n### Input:\n{t.input}"
            text += "\n\n### Response:\n"
            if open_last and k == len(parts) - 1 and i == len(part.turns) - 1:
                break
            start = len(text)
            text += t.answer + EOS
            spans.append((start, len(text)))
    return text, spans


def prompt(conv: Conversation, open_last: bool = False) -> str:
    """The paper's template for `conv`. With open_last (implied when the last answer is ""), the string ends with
    the last turn's "### Response:\\n": the prompt from which a model writes that answer."""
    return layout([conv], open_last)[0]


# ----------------------------------------------------------------------------------------------------------------
# Pictures

def load_image(source, max_pixels: int | None = None) -> Image.Image:
    """An RGB picture from a path or a binary file object: EXIF rotation applied; palette, alpha (composited on
    white), grey, CMYK and 16-bit modes converted. A picture of more than max_pixels pixels is refused before it is
    decoded (a small file can declare a huge picture). Raises DataError naming it (a path) when unreadable."""
    name = f" {source}" if isinstance(source, str) else ""
    try:
        with Image.open(source) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"picture{name} of {im.width} x {im.height} pixels, more than the {max_pixels:,} "
                                f"allowed")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # unreadable EXIF: there is no orientation to apply
                pass
            return _to_rgb(im)
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError, ...
        detail = str(e) if name else str(e).replace(f" {source!r}", "")   # PIL names a file object by its address
        raise DataError(f"unreadable picture{name}: {type(e).__name__}: {detail}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (or wider) grey: scale to 8 bits, assuming the 16-bit range once values exceed 8 bits.
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max(initial=0) > 255 else a
        im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")
