"""The built-in demo: a world small enough to train from random weights on a CPU in minutes, made in the real
formats so that everything downstream (loaders, data pipeline, train.py, chat.py) runs as it does for the paper.

Read top-down:
  SETTINGS, PREFIX          train.py's defaults for the demo (where they differ from the paper's), and for the
                            demo with prefix fusion (where they differ from those)
  the pictures              synthetic scenes (1-3 like shapes along a side) as "demo:<json>" descriptions, drawn
                            into PNG files (materialise) so that conversation.load_image reads them like any picture
  train_set, eval_set       conversations whose answers need the picture (colour, shape, count, position), and
                            short language-only instructions; a held-out set from another random stream
  score, chance             exact-answer scoring per question kind (train.py's evaluation and eval.py share it)
  corpus, tokenizer         a sentencepiece model trained on the demo's text, with LLaMA's settings
  make_base                 the random "pretrained" model: HF LLaMA dir, OpenFlamingo checkpoint.pt, CLIP weights
"""
import hashlib
import json
import os
import random
import re
import tempfile
from collections import Counter

import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

import checkpoints
import mmgpt
from conversation import HEADER, Conversation, Turn, prompt
from tokenizer import Tokenizer

# train.py's defaults for the demo where they differ from the paper's. Nothing is pretrained, so it trains in full
# (the ViT too, at its own lr) and faster, and its pictures reach the answer directly (attend_previous: from random
# weights the paper's rule, where the answer reaches the picture only through the tokens before <image>, is learned
# too slowly). 2.5 passes over the data: after 2 one kind of question still lagged (docs/demo.md).
SETTINGS = dict(config="configs/demo.json", out="runs/demo", lr=2e-3, warmup=50, grad_accum=1, batch_size=16,
                max_len=128, epochs=2.5, eval_every=250, save_every=250, attend_previous=True, vision_lr=3e-4,
                unfreeze=["embed_tokens", "layers.", "norm.", "lm_head", "perceiver"])
# train.py --fusion prefix: the demo's run beside the default one, its ViT and decoder trained more slowly: at
# SETTINGS' rates prefix fusion never learns where the shapes are (the rates tried: docs/fusion.md).
PREFIX = dict(out="runs/demo-prefix", lr=5e-4, vision_lr=1e-4)
# Where the pictures are drawn unless a config says otherwise: a cache (each file is named by what it shows).
PICTURES = os.path.join(tempfile.gettempdir(), "mmgpt-demo-pictures")

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 235), "yellow": (240, 210, 20),
                "purple": (150, 50, 210), "orange": (245, 130, 0)}
SHAPES = ("square", "circle", "triangle")
# The side of the picture the shapes stand on, and the line they stand along (centre x, y as fractions).
SIDES = {"left": ((0.25, 0), (0.25, 1)), "right": ((0.75, 0), (0.75, 1)), "top": ((0, 0.25), (1, 0.25)),
         "bottom": ((0, 0.75), (1, 0.75))}
# Radius in pixels: areas of 220-290 px, so the coloured area tells the number and the outline the shape. Three
# fit along a side without touching; four would have to shrink to about half that area, too small to tell apart.
RADIUS = {"square": 8, "circle": 9, "triangle": 10}
COUNTS = ("1", "2", "3")
ANSWERS = {"shape": SHAPES, "colour": tuple(COLOURS), "count": COUNTS, "position": tuple(SIDES)}
KIND = {a: kind for kind, answers in ANSWERS.items() for a in answers}  # answer -> its question kind
# Each kind's wordings fit one shape and several alike: a question's words never tell how many there are.
QUESTIONS = {
    "shape": ("What shape is it?", "Which shape do you see?"),
    "colour": ("What colour is the shape?", "What color are the shapes?"),
    "count": ("How many shapes are there?", "How many shapes do you see?"),
    "position": ("Where is the shape?", "Where are they?"),   # never naming it: a later turn may ask for that
}
WORDS = ("cat", "dog", "sun", "tree", "book", "bird", "fish", "cup", "hat", "star")
OPPOSITES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "big": "small",
                  "small": "big", "black": "white", "white": "black", "yes": "no", "no": "yes"}


def _picture(rng: random.Random) -> tuple[str, dict]:
    """A random scene as a "demo:" path, and its facts (shape, colour, count, position): 1-3 shapes of one
    kind and one colour, evenly spaced along one side of the picture (one shape: at that side's middle), on a
    dark tinted grey of random shade. Every fact is drawn uniformly, so each question's chance is 1 / answers.

    Why dark: in the demo's random ViT, pooled over the picture, a background of any lightness (0-255) takes
    most of the variance between pictures and the count explains 2% of it; on shades 0-60 the count explains
    10% and the colour 58% (400 pictures), which a model trained for minutes can pick up."""
    shape, colour, side = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIDES))
    n = rng.randint(1, len(COUNTS))
    grey = rng.randint(0, 60)
    background = [min(255, max(0, grey + rng.randint(-15, 15))) for _ in range(3)]
    (x0, y0), (x1, y1) = SIDES[side]
    centres = [(x0 + (x1 - x0) * (i + 0.5) / n, y0 + (y1 - y0) * (i + 0.5) / n) for i in range(n)]
    across = [rng.randint(-2, 2) for _ in centres]   # jitter across the line only: neighbours never overlap
    shapes = [[shape, colour, round(x * SIZE) + (d if x0 == x1 else 0), round(y * SIZE) + (0 if x0 == x1 else d),
               RADIUS[shape]] for (x, y), d in zip(centres, across)]
    scene = {"background": background, "shapes": shapes}
    facts = {"shape": shape, "colour": colour, "count": str(n), "position": side}
    return "demo:" + json.dumps(scene, separators=(",", ":")), facts


def draw(path: str) -> Image.Image:
    """Draw a "demo:" scene: {"background": [r, g, b], "shapes": [[shape, colour, cx, cy, radius], ...]}."""
    scene = json.loads(path[len("demo:"):])
    im = Image.new("RGB", (SIZE, SIZE), tuple(scene["background"]))
    draw = ImageDraw.Draw(im)
    for shape, colour, cx, cy, r in scene["shapes"]:
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def materialise(convs: list[Conversation], folder: str) -> list[Conversation]:
    """The same conversations with each "demo:" scene drawn into a PNG under folder, named by the scene's hash:
    a picture is drawn once and the folder can be shared by runs and ranks (each file is written atomically).
    PNG is lossless, so the pixels are exactly draw()'s."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for conv in convs:
        if conv.image is not None and conv.image.startswith("demo:"):
            path = os.path.join(folder, hashlib.sha1(conv.image.encode()).hexdigest()[:20] + ".png")
            if not os.path.isfile(path):
                tmp = f"{path}.tmp{os.getpid()}"
                draw(conv.image).save(tmp, format="PNG")
                os.replace(tmp, path)
            conv = Conversation(path, conv.turns, source=conv.source)
        out.append(conv)
    return out


def _vl(rng: random.Random) -> Conversation:
    """A picture with questions of different kinds about it, in random order: half the time all four kinds, else
    one to four. Several turns per picture give a tiny model more to learn from each one."""
    image, facts = _picture(rng)
    kinds = rng.sample(list(QUESTIONS), len(QUESTIONS) if rng.random() < 0.5 else rng.randint(1, len(QUESTIONS)))
    turns = [Turn(rng.choice(QUESTIONS[k]), facts[k]) for k in kinds]
    return Conversation(image, turns, source="demo")


def _lang(rng: random.Random) -> Conversation:
    """Short, learnable language-only instructions: sums (asked, or given as the input), opposites, repeating
    the word given as the input."""
    turns = []
    for _ in range(rng.choice((1, 1, 2))):
        task, a, b = rng.randrange(4), rng.randint(0, 9), rng.randint(0, 9)
        if task == 0:
            turns.append(Turn(f"What is {a} plus {b}?", str(a + b)))
        elif task == 1:
            turns.append(Turn("Add the two numbers.", str(a + b), f"{a} and {b}"))
        elif task == 2:
            word = rng.choice(list(OPPOSITES))
            turns.append(Turn(f"What is the opposite of {word}?", OPPOSITES[word]))
        else:
            word = rng.choice(WORDS)
            turns.append(Turn("Repeat the word.", word, word))
    return Conversation(None, turns, source="demo_lang")


def train_set(vl: int = 4000, lang: int = 2000, seed: int = 0, pictures: str | None = None
              ) -> tuple[list[Conversation], list[Conversation]]:
    """(vision-language, language-only) training conversations, deterministic in seed. Pictures are "demo:"
    scenes, or PNG files under `pictures` when given (see materialise)."""
    rng = random.Random(f"demo-train:{seed}")
    vl_convs = [_vl(rng) for _ in range(vl)]
    lang_convs = [_lang(rng) for _ in range(lang)]
    return (vl_convs if pictures is None else materialise(vl_convs, pictures)), lang_convs


def eval_set(n: int = 200, seed: int = 0, pictures: str | None = None) -> list[tuple[Conversation, str]]:
    """Held-out (conversation, expected answer) items, from a random stream other than training's. The
    conversation's last answer is "" (prompt() then ends where the model answers); earlier turns are answered.
    Pictures as in train_set."""
    rng = random.Random(f"demo-eval:{seed}")
    items = []
    for _ in range(n):
        conv = _vl(rng)
        expected = conv.turns[-1].answer
        conv.turns[-1] = Turn(conv.turns[-1].question, "")
        items.append((conv, expected))
    if pictures is not None:
        items = list(zip(materialise([c for c, _ in items], pictures), [e for _, e in items]))
    return items


def answer_matches(generated: str, expected: str) -> bool:
    """Exact-answer scoring: equal after stripping, ignoring case and a trailing period."""
    def norm(s: str) -> str:
        return s.strip().lower().removesuffix(".").strip()
    return norm(generated) == norm(expected)


def chance(expected: list[str]) -> float:
    """Accuracy of guessing uniformly among the possible answers of each expected answer's question kind."""
    return sum(1 / len(ANSWERS[KIND[e]]) for e in expected) / len(expected)


def score(expected: list[str], answers: list[str]) -> dict:
    """Exact-answer accuracy of generated answers, overall and per question kind, and the chance level."""
    correct, asked = Counter(), Counter()
    for e, a in zip(expected, answers, strict=True):
        correct[KIND[e]] += answer_matches(a, e)
        asked[KIND[e]] += 1
    out = {"accuracy": sum(correct.values()) / len(expected), "chance": chance(expected)}
    return out | {f"accuracy_{k}": correct[k] / asked[k] for k in ANSWERS if asked[k]}


def corpus() -> list[str]:
    """Every kind of text the demo set holds, one line each, special tokens removed: a sentencepiece corpus."""
    vl, lang = train_set(vl=400, lang=400, seed=0)
    lines = [HEADER, "### Image:", "### Instruction:", "### Input:", "### Response:"]
    lines += [q for qs in QUESTIONS.values() for q in qs]
    lines += [a for answers in ANSWERS.values() for a in answers] + [str(i) for i in range(19)]
    lines += list(WORDS) + list(OPPOSITES)
    for conv in vl + lang:
        text = re.sub(r"<image>|</s>", "\n", prompt(conv))
        lines += [line for line in text.split("\n") if line.strip()]
    return lines


def tokenizer(model_prefix: str, vocab_size: int = 1000) -> str:
    """Train a sentencepiece model on corpus() with LLaMA's settings (vocab_size is an upper bound: the
    corpus is small); returns the .model path."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=model_prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return model_prefix + ".model"


# ----------------------------------------------------------------------------------------------------------------
# The demo's base model: random, tiny, written in the real formats so that everything downstream is the same.

def make_base(out: str, seed: int) -> dict:
    """A sentencepiece tokenizer trained on the demo text, a tiny LLaMA + ViT + perceiver with random weights,
    saved as an HF LLaMA dir, an OpenFlamingo checkpoint.pt and an open_clip config + weights file."""
    base = os.path.join(out, "base")
    paths = {"llama": os.path.join(base, "llama"), "openflamingo": os.path.join(base, "openflamingo.pt"),
             "vision": os.path.join(base, "vision.json"), "vision_weights": os.path.join(base, "vision.pt")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(paths["llama"], exist_ok=True)
    tok = Tokenizer(tokenizer(os.path.join(base, "tokenizer")))
    cfg = mmgpt.config("demo", vocab_size=tok.vocab_size, image_id=tok.image_id)
    torch.manual_seed(seed)
    model = mmgpt.build(cfg)
    # The cross-attention gates start at 0 so that a pretrained LLaMA is unchanged at first. A random LLaMA has
    # nothing to protect, and closed gates keep the pictures' gradients near zero: the demo opens them
    # (tanh(1) = 0.76; docs/demo.md).
    with torch.no_grad():
        for layer in model.layers:
            if layer.xattn is not None:
                layer.xattn.attn_gate.fill_(1.0)
                layer.xattn.ff_gate.fill_(1.0)
        # The random ViT's position embeddings (std width^-0.5) are small beside its patch embeddings, so once the
        # perceiver pools the patches, where the shapes stand is faint; three times larger, the side survives
        # the pooling (docs/demo.md).
        model.vision.visual.positional_embedding.mul_(3)
    checkpoints.save_llama(model, paths["llama"], os.path.join(base, "tokenizer.model"))
    checkpoints.save_openflamingo(model, paths["openflamingo"])
    with open(paths["vision"], "w") as f:
        json.dump(cfg.vision, f)
    torch.save(model.vision.visual.state_dict(), paths["vision_weights"])
    return paths
