"""MultiModal-GPT's instruction data: each source read in the format people download it in, rendered on the
paper's unified template with the loss only on the answers, and batches for DDP. (The built-in demo set is in
demo.py; a config's "demo" entry brings it in.)

Read top-down:
  render                                  a conversation (conversation.py: the template) -> (input_ids, labels)
  read and its readers                    one source's annotation files -> conversations
  get_field, text_field, texts_field      a record's fields, every failure naming file, record and field (eval.py
                                          reads benchmark files with them too)
  Mix, load_mix                           a config file -> vision-language and language-only conversations
  InstructionDataset, collate, Stream     conversations -> padded batches, sharded by rank, resumable
  main                                    python data.py CONFIG --show N | --check [--skip-bad]

Config file (JSON):
  {"seed": 0,                              read-time choices (caption questions, ...), `sample` and `weight`
   "vl":   [SOURCE, ...],                  vision-language sources; one epoch = each of their conversations once
   "lang": [SOURCE, ...],                  language-only sources, cycled independently of "vl"
   "demo": {"vl": 4000, "lang": 2000, "seed": 0}}     optional: demo.py's built-in set (counts of conversations;
                                           "pictures": the folder its pictures are drawn into, default demo.PICTURES)
  SOURCE = {"kind": one of KINDS, "ann": [annotation files], "image_root": picture folder (vision kinds),
            "sample": N (draw N conversations once, seeded) or null (all), "weight": times per epoch (default 1;
            a fraction draws that share of the conversations once), "name": label in the counts (default: kind),
            and the kind's options (the fields of Options, each naming the kinds that take it)}.
  Relative paths are relative to the current directory (configs/mmgpt.json expects the repository root).

Batch (from `collate`, yielded by `Stream`):
  input_ids (B, T) long, right-padded with tokenizer.pad_id; labels (B, T) long: the id on the tokens of each
  answer and its </s>, -100 elsewhere and on padding; attention_mask (B, T) long, 1 = token, 0 = padding;
  images (B, 1, 3, H, W) float from the caller's image_transform, or None for a language-only batch.

Bad input raises DataError naming the file, the record (index, line or id) and the field. With skip_bad (CLI
--skip-bad) bad records, missing pictures and unreadable pictures are skipped instead, and counted.
"""
import argparse
import json
import os
import random
import re
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field, fields
from functools import partial

import numpy as np
import torch

from conversation import Conversation, DataError, Turn, layout, load_image, prompt


# ----------------------------------------------------------------------------------------------------------------
# A conversation -> training ids and labels (the template itself is in conversation.py)

def render(conv: Conversation, tokenizer, max_len: int | None = 512) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of prompt(conv): one BOS; labels equal the ids on the tokens of every answer and its
    </s>, -100 elsewhere. Kept to the first max_len tokens; returns None when that leaves no loss token (the
    callers drop and count such samples).

    The string is tokenised once, so the ids are exactly tokenizer.encode(prompt(conv)); a token is a loss token
    iff its character span overlaps an answer's span (a zero-width one, like the first byte-fallback token of a
    character, counts when it sits inside it)."""
    text, answers = layout([conv])
    ids, spans = tokenizer.encode_spans(text)
    labels, k = [], 0
    for tok, (s, e) in zip(ids, spans):   # spans and answers both run left to right
        while k < len(answers) and answers[k][1] <= s:
            k += 1
        inside = k < len(answers) and (e > answers[k][0] or (s == e and s >= answers[k][0]))
        labels.append(tok if inside else -100)
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    if all(x == -100 for x in labels):
        return None
    return ids, labels


# ----------------------------------------------------------------------------------------------------------------
# Readers: each source in its published format

# Paper Table 3 and the longer list MultiModal-GPT drew caption questions from.
CAPTION_QUESTIONS = [
    "Can you describe the image?",
    "Could you provide a description of the image?",
    "What do you see in this image?",
    "Share your thoughts on the content of the image.",
    "Please narrate what's happening in the picture.",
    "Can you give a brief explanation of the image?",
    "Describe the main elements and details present in the image.",
    "In your own words, what is depicted in the image?",
    "How would you describe the image's content in a caption?",
    "Can you suggest an insightful caption that highlights the underlying message of the image?",
    "Please describe the image.",
    "Can you outline the key aspects of the image?",
    "What are the most striking features in this image?",
    "Please provide a summary of the image's content.",
    "Describe the overall theme or concept captured in the image.",
    "How would you explain the image's composition and focus?",
    "What is the focal point or main subject of the image?",
    "How do the different components of the image interact with each other?",
    "What would be a fitting caption for this image?",
    "Can you create a concise description that captures the essence of the image?",
    "How would you briefly summarize the content of this image in a phrase or sentence?",
    "Please provide a catchy and relevant caption for this picture.",
    "If you were to give this image a title, what would it be?",
    "Describe the image in one creative sentence.",
    "Please suggest a memorable phrase that encapsulates the image's content.",
    "What engaging phrase would best represent this image?",
    "Can you create an expressive caption that highlights the main theme of the image?",
    "How would you sum up the image's story for a caption?",
    "Provide an eye-catching caption that conveys the image's core message.",
    "If you were to give this image a headline, what would it say?",
    "Can you craft a captivating caption that communicates the essence of the image?",
    "How would you describe the image's content in a powerful caption?",
    "Please provide an inventive title to summarize the scene depicted in the image.",
    "Compose a concise and striking phrase that reflects the image's key elements.",
    "If you were to create a caption for this image, what would it be?",
    "Offer a compelling caption that highlights the central focus of the image.",
    "Can you produce a unique caption that encapsulates the image's overall mood?",
    "Please generate an attention-grabbing caption that would best illustrate the events captured in this image.",
    "How would you express the image's main idea in an impactful sentence?",
    "Please create a vivid and concise title that conveys the essence of the picture.",
    "Compose an imaginative caption that reflects the image's most striking features.",
    "What memorable statement would best represent the scene illustrated in this image?",
    "Draft an evocative caption that brings the image to life for the reader.",
    "What engaging phrase would effectively convey the action or subject matter depicted in this picture?",
    "How would you encapsulate the image's core theme in a concise and expressive manner?",
    "Please provide a creative and impactful title that captures the spirit of the image.",
    "Craft a captivating caption that showcases the image's most prominent attributes.",
    "What intriguing statement would best sum up the scene presented in this image?",
    "Develop a descriptive caption that paints a vivid picture for the viewer.",
    "Can you give a detailed account of the image's contents?",
    "What are the key elements and features visible in this image?",
    "How would you narrate the events or actions depicted in the picture?",
    "Please share your observations about the various components present in the image.",
    "What is the overall theme or concept captured in this image? Can you describe it?",
]

# The follow-ups MultiModal-GPT appended to A-OKVQA questions, whose answers carry the rationales.
WHY_QUESTIONS = ["Why?", "Why is this?", "And why?", "What is the reason?", "And can you tell me why?",
                 "Can you tell me why?", "Can you tell me the reason?"]


@dataclass
class Options:
    """The per-source options of a config, each with the kinds that take it (the one list of them)."""
    # aokvqa: chance that the choices are shown as "### Input:"
    option_prob: float = field(default=0.5, metadata={"kinds": ("aokvqa",)})
    # minigpt4, coco_caption: one conversation per caption (else one random caption)
    all_captions: bool = field(default=False, metadata={"kinds": ("minigpt4", "coco_caption")})
    # ocr_vqa: all of a record's question/answer pairs as turns (else one per pair)
    ocr_turns: bool = field(default=True, metadata={"kinds": ("ocr_vqa",)})


OPTION_NAMES = tuple(f.name for f in fields(Options))


def read(kind: str, ann_paths, image_root: str | None = None, *, seed: int | str = 0,
         errors: list | None = None, check_images: bool = True, **options) -> list[Conversation]:
    """The conversations of one source: `ann_paths` (a path or a list) in `kind`'s published format.

    Picture paths are resolved under image_root (or the current directory) and must exist (check_images).
    Random choices (caption questions, A-OKVQA follow-ups and shown choices) come from `seed`. A bad file,
    record or picture raises DataError; when `errors` is a list, it is appended there and skipped instead.
    options: the fields of Options that apply to `kind`.
    """
    if kind not in READERS:
        raise DataError(f"unknown kind {kind!r} (known: {', '.join(READERS)})")
    reader, container, has_images = READERS[kind]
    unknown = set(options) - set(KIND_OPTIONS.get(kind, ()))
    if unknown:
        raise DataError(f"{kind}: unknown option(s) {', '.join(sorted(unknown))}")
    opt, rng = Options(**options), random.Random(seed)
    paths = [ann_paths] if isinstance(ann_paths, (str, os.PathLike)) else list(ann_paths)
    root = os.fspath(image_root) if image_root is not None else ""
    convs = []
    for path in map(os.fspath, paths):
        try:
            records = _records(path, container)
        except DataError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        for where, key, rec in records:
            try:
                if isinstance(rec, DataError):
                    raise rec
                new = reader(rec, key, where, root, rng, opt)
                for c in new:
                    c.source = f"{kind}:{path}"
                    if has_images and check_images and not os.path.isfile(c.image):
                        raise DataError(f"{where}: picture not found: {c.image} (source {kind})")
            except DataError as e:
                if errors is None:
                    raise
                errors.append(e)
                continue
            convs += new
    return convs


def read_text(path: str) -> str:
    """An annotation file's text; a missing, empty or non-UTF-8 one is a DataError naming it (and the line)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: annotation file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {e.start}: {raw[e.start:e.end]!r}); "
                        f"re-save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _records(path: str, container: str) -> list[tuple[str, object, object]]:
    """(where, key, record) for each record of an annotation file; `where` names the file and the record.
    container: "list" (a JSON list, or JSON lines), "annotations" ({"annotations": [...]}), "dict" ({id: record}).
    A malformed JSON line comes as a DataError in place of its record, so that only it can be skipped."""
    text = read_text(path)
    if not path.endswith(".jsonl"):
        try:
            return _json_records(path, json.loads(text), container)
        except json.JSONDecodeError as e:
            # A first line that is a whole JSON value followed by more is JSON lines under another name.
            if e.msg != "Extra data" or not _is_json(text.split("\n", 1)[0]):
                raise DataError(f"{path} line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None
    if container != "list":
        raise DataError(f"{path}: expected one JSON object, not JSON lines")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path} line {n}", n, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((f"{path} line {n}", n,
                                DataError(f"{path} line {n} column {e.colno}: malformed JSON line: {e.msg}")))
    return records


def _json_records(path: str, data, container: str) -> list[tuple[str, object, object]]:
    if container == "annotations":
        if not isinstance(data, dict) or "annotations" not in data:
            raise DataError(f"{path}: missing field 'annotations' (expected {{\"annotations\": [...]}})")
        if not isinstance(data["annotations"], list):
            raise DataError(f"{path}: field 'annotations': expected a list")
        return [(f"{path} annotations[{i}]", i, r) for i, r in enumerate(data["annotations"])]
    if container == "dict":
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object of records keyed by id")
        return [(f"{path} record {k!r}", k, r) for k, r in data.items()]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"{path} record {i}", i, r) for i, r in enumerate(data)]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


# Field access: every failure names the record and the field (`where`: the file and the record). Public: eval.py's
# readers use them too, so a bad benchmark file reads like a bad training file.

def get_field(rec, name: str, where: str):
    """rec[name], rec a JSON object."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise DataError(f"{where}: missing field '{name}'")
    return rec[name]


def as_text(value, name: str, where: str, empty_ok: bool = False) -> str:
    """value (field `name`) as stripped text: a number becomes its text; anything else, a lone surrogate, or
    (unless empty_ok) nothing, is a DataError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # e.g. a numeric id or answer
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected text, got {type(value).__name__}")
    try:  # JSON "\ud800": scraped data has it; no tokenizer or file can take it
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field '{name}': a lone surrogate (\\u{ord(value[e.start]):04x}) at character "
                        f"{e.start} is not text") from None
    value = value.strip()
    if not value and not empty_ok:
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def text_field(rec, name: str, where: str, empty_ok: bool = False) -> str:
    """rec[name] as text (as_text)."""
    return as_text(get_field(rec, name, where), name, where, empty_ok)


def texts_field(rec, name: str, where: str, single_ok: bool = False) -> list[str]:
    """A non-empty list of texts (or, with single_ok, one text)."""
    value = get_field(rec, name, where)
    if single_ok and not isinstance(value, list):
        return [as_text(value, name, where)]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}': expected a non-empty list")
    return [as_text(v, f"{name}[{i}]", where) for i, v in enumerate(value)]


def _strip_image_marker(question: str) -> str:
    """Remove `<image>` wherever it stands (LLaVA puts it before or after the question)."""
    return " ".join(part.strip() for part in question.split("<image>") if part.strip())


def _llava(rec, key, where, root, rng, opt) -> list[Conversation]:
    """LLaVA-Instruct-150K (detail_23k, complex_reasoning_77k, conversation_58k): every human/gpt pair, in order."""
    image = text_field(rec, "image", where)
    msgs = get_field(rec, "conversations", where)
    if not isinstance(msgs, list) or not msgs or len(msgs) % 2:
        raise DataError(f"{where}: field 'conversations': expected human/gpt message pairs")
    turns = []
    for i in range(0, len(msgs), 2):
        question, answer = (_llava_message(msgs[j], j, who, where) for j, who in ((i, "human"), (i + 1, "gpt")))
        question = _strip_image_marker(question)
        if not question:
            raise DataError(f"{where}: field 'conversations[{i}].value' has no question besides <image>")
        turns.append(Turn(question, answer))
    return [Conversation(os.path.join(root, image), turns)]


def _llava_message(msg, j: int, who: str, where: str) -> str:
    name = f"conversations[{j}]"
    for key in ("from", "value"):
        if not isinstance(msg, dict) or key not in msg:
            raise DataError(f"{where}: missing field '{name}.{key}'")
    if msg["from"] != who:
        raise DataError(f"{where}: field '{name}.from': expected {who!r}, got {msg['from']!r}")
    return as_text(msg["value"], f"{name}.value", where)


def _captions(rec, where, rng, opt) -> list[str]:
    captions = texts_field(rec, "caption", where, single_ok=True)
    return captions if opt.all_captions else [rng.choice(captions)]


def _minigpt4(rec, key, where, root, rng, opt) -> list[Conversation]:
    """MiniGPT-4 cc_sbu_align filter_cap.json; picture {root}/{image_id}.jpg; question from CAPTION_QUESTIONS."""
    path = os.path.join(root, text_field(rec, "image_id", where) + ".jpg")
    return [Conversation(path, [Turn(rng.choice(CAPTION_QUESTIONS), c)]) for c in _captions(rec, where, rng, opt)]


def _coco_caption(rec, key, where, root, rng, opt) -> list[Conversation]:
    """COCO Caption, Karpathy split as LAVIS ships it; picture {root}/{image}; question from CAPTION_QUESTIONS."""
    path = os.path.join(root, text_field(rec, "image", where))
    return [Conversation(path, [Turn(rng.choice(CAPTION_QUESTIONS), c)]) for c in _captions(rec, where, rng, opt)]


def _aokvqa(rec, key, where, root, rng, opt) -> list[Conversation]:
    """A-OKVQA: 'The answer is {choice}. Because {rationales}' to the question plus a why-follow-up."""
    question = text_field(rec, "question", where)
    choices = texts_field(rec, "choices", where)
    idx = get_field(rec, "correct_choice_idx", where)
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(choices):
        raise DataError(f"{where}: field 'correct_choice_idx': expected an index into the {len(choices)} choices")
    rationales = texts_field(rec, "rationales", where)
    image_id = get_field(rec, "image_id", where)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise DataError(f"{where}: field 'image_id': expected an integer")
    path = os.path.join(root, f"{text_field(rec, 'split', where)}2017", f"{image_id:012d}.jpg")
    shown = ", ".join(choices) if rng.random() < opt.option_prob else ""
    turn = Turn(f"{question} {rng.choice(WHY_QUESTIONS)}",
                f"The answer is {choices[idx]}. Because {' '.join(rationales)}", shown)
    return [Conversation(path, [turn])]


def _ocr_vqa(rec, key, where, root, rng, opt) -> list[Conversation]:
    """OCR-VQA dataset.json: {id: record}; picture {root}/{id}{extension of imageURL}."""
    url = text_field(rec, "imageURL", where)
    path = os.path.join(root, f"{key}{os.path.splitext(urllib.parse.urlparse(url).path)[1]}")
    questions, answers = texts_field(rec, "questions", where), texts_field(rec, "answers", where)
    if len(questions) != len(answers):
        raise DataError(f"{where}: field 'answers': {len(answers)} answers to {len(questions)} questions")
    turns = [Turn(q, a) for q, a in zip(questions, answers)]
    return [Conversation(path, turns)] if opt.ocr_turns else [Conversation(path, [t]) for t in turns]


def _dolly(rec, key, where, root, rng, opt) -> list[Conversation]:
    """databricks-dolly-15k.jsonl: instruction, context (the input, may be empty), response."""
    return [Conversation(None, [Turn(text_field(rec, "instruction", where), text_field(rec, "response", where),
                                     text_field(rec, "context", where, empty_ok=True))])]


def _alpaca(rec, key, where, root, rng, opt) -> list[Conversation]:
    """alpaca_gpt4_data.json: instruction, input (may be empty), output."""
    return [Conversation(None, [Turn(text_field(rec, "instruction", where), text_field(rec, "output", where),
                                     text_field(rec, "input", where, empty_ok=True))])]


def _baize(rec, key, where, root, rng, opt) -> list[Conversation]:
    """Baize: "input" is a dialogue of [|Human|] / [|AI|] turns after a preamble; its last, empty [|Human|] turn
    (where the next question would go) is ignored."""
    parts = re.split(r"\[\|(Human|AI)\|\]", text_field(rec, "input", where))
    messages = [(who, text.strip()) for who, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1] == ("Human", ""):
        messages.pop()
    if not messages or len(messages) % 2:
        raise DataError(f"{where}: field 'input': expected [|Human|] / [|AI|] pairs")
    turns = []
    for i in range(0, len(messages), 2):
        (who_q, q), (who_a, a) = messages[i], messages[i + 1]
        if (who_q, who_a) != ("Human", "AI") or not q or not a:
            raise DataError(f"{where}: field 'input': turn {i // 2} is not a non-empty [|Human|] then [|AI|]")
        turns.append(Turn(q, a))
    return [Conversation(None, turns)]


# kind -> (reader, file container, has pictures)
READERS = {
    "llava": (_llava, "list", True),         # detail_23k, complex_reasoning_77k (one turn each; all turns read)
    "llava_dial": (_llava, "list", True),    # conversation_58k: every turn, in order
    "minigpt4": (_minigpt4, "annotations", True),
    "aokvqa": (_aokvqa, "list", True),
    "coco_caption": (_coco_caption, "list", True),
    "ocr_vqa": (_ocr_vqa, "dict", True),
    "dolly": (_dolly, "list", False),
    "alpaca_gpt4": (_alpaca, "list", False),
    "baize": (_baize, "list", False),
}
KINDS = tuple(READERS)
KIND_OPTIONS = {kind: tuple(f.name for f in fields(Options) if kind in f.metadata["kinds"]) for kind in KINDS}


# ----------------------------------------------------------------------------------------------------------------
# A config file -> the training mix

@dataclass
class Mix:
    vl: list[Conversation]          # vision-language conversations (one epoch = each once)
    lang: list[Conversation]        # language-only conversations (cycled)
    counts: dict[str, int]          # conversations per source name, after sample/weight
    errors: list[DataError]         # bad records and pictures skipped (only with skip_bad)


SOURCE_KEYS = {"kind", "ann", "image_root", "sample", "weight", "name", *OPTION_NAMES}


def load_mix(config_path: str, *, skip_bad: bool = False, check_images: bool = True) -> Mix:
    """Read every source of a config file (schema at the top of this file)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise DataError(f"{config_path}: cannot read config: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{config_path} line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfg, dict) or set(cfg) - {"seed", "vl", "lang", "demo"}:
        raise DataError(f"{config_path}: expected an object with keys seed, vl, lang, demo")
    seed = cfg.get("seed", 0)
    mix = Mix([], [], {}, [])
    for group in ("vl", "lang"):
        for i, src in enumerate(cfg.get(group, [])):
            where = f"{config_path} {group}[{i}]"
            if not isinstance(src, dict):
                raise DataError(f"{where}: expected a source object")
            if set(src) - SOURCE_KEYS:
                raise DataError(f"{where}: unknown field(s) {', '.join(sorted(set(src) - SOURCE_KEYS))}")
            kind = get_field(src, "kind", where)
            if kind not in READERS:
                raise DataError(f"{where}: field 'kind': unknown kind {kind!r} (known: {', '.join(KINDS)})")
            if READERS[kind][2] != (group == "vl"):
                raise DataError(f"{where}: field 'kind': {kind} belongs in \"{'vl' if READERS[kind][2] else 'lang'}\"")
            options = {k: src[k] for k in OPTION_NAMES if k in src}
            convs = read(kind, get_field(src, "ann", where), src.get("image_root"), seed=f"{seed}:{group}:{i}",
                         errors=mix.errors if skip_bad else None, check_images=check_images, **options)
            convs = _sample_and_weight(convs, src.get("sample"), src.get("weight", 1), f"{seed}:{group}:{i}", where)
            name = src.get("name", kind)
            mix.counts[name] = mix.counts.get(name, 0) + len(convs)
            (mix.vl if group == "vl" else mix.lang).extend(convs)
    if "demo" in cfg:
        demo = cfg["demo"]
        if not isinstance(demo, dict) or set(demo) - {"vl", "lang", "seed", "pictures"}:
            raise DataError(f"{config_path} demo: expected an object with keys vl, lang, seed, pictures")
        import demo as demo_set  # the demo is its own module; only a config that asks for it loads it
        vl, lang = demo_set.train_set(**{"pictures": demo_set.PICTURES, **demo})
        mix.vl += vl
        mix.lang += lang
        mix.counts["demo"] = len(vl)
        mix.counts["demo_lang"] = len(lang)
    return mix


def _sample_and_weight(convs: list, sample, weight, seed: str, where: str) -> list:
    """`sample` conversations drawn once, then each repeated `weight` times (a fraction: that share, drawn)."""
    rng = random.Random(seed + ":sample")
    if sample is not None:
        if not isinstance(sample, int) or sample < 0:
            raise DataError(f"{where}: field 'sample': expected a count or null")
        if sample > len(convs):
            print(f"note: {where}: sample {sample} > {len(convs)} conversations read: all are used", file=sys.stderr)
        convs = rng.sample(convs, min(sample, len(convs)))
    if not isinstance(weight, (int, float)) or weight < 0:
        raise DataError(f"{where}: field 'weight': expected a number >= 0")
    whole = int(weight)
    return convs * whole + rng.sample(convs, round((weight - whole) * len(convs)))


# ----------------------------------------------------------------------------------------------------------------
# Training batches

def sample_length(conv: Conversation, tokenizer, max_len: int) -> int | None:
    """Tokens in conv's training sample (at most max_len), or None when truncation leaves no loss token.

    Fast and exact without render(): the tokenizer encodes the text between special tokens piece by piece, so
    the text up to the first answer's </s> encodes to the first ids of the whole; if they fit, the sample keeps
    a loss token (that </s>). Only a first answer that straddles max_len needs the full label check."""
    text, answers = layout([conv])
    n = len(tokenizer.encode(text))
    if n <= max_len or (answers and len(tokenizer.encode(text[:answers[0][1]])) <= max_len):
        return min(n, max_len)
    return None if render(conv, tokenizer, max_len) is None else max_len


class InstructionDataset(torch.utils.data.Dataset):
    """Rendered samples with their pictures. Conversations that truncation to max_len would leave without a loss
    token are dropped here, once, and counted (`dropped`); `lengths` (tokens, up to max_len) serve grouping.
    An item is {"input_ids", "labels", "image"} (image: the transformed picture or None), or None for an
    unreadable picture under skip_bad (else DataError naming the source and the path)."""

    def __init__(self, convs: list[Conversation], tokenizer, image_transform=None, max_len: int = 512,
                 skip_bad: bool = False):
        self.tokenizer, self.image_transform, self.max_len = tokenizer, image_transform, max_len
        self.skip_bad = skip_bad
        if image_transform is None and any(c.image is not None for c in convs):
            raise ValueError("conversations with pictures need an image_transform")
        self.convs, self.lengths, self.dropped = [], [], 0
        for conv in convs:
            n = sample_length(conv, tokenizer, max_len)
            if n is None:
                self.dropped += 1
            else:
                self.convs.append(conv)
                self.lengths.append(n)

    def __len__(self) -> int:
        return len(self.convs)

    def __getitem__(self, i: int) -> dict | None:
        conv = self.convs[i]
        ids, labels = render(conv, self.tokenizer, self.max_len)
        image = None
        if conv.image is not None:
            try:
                image = self.image_transform(load_image(conv.image))
            except DataError as e:
                if self.skip_bad:
                    return None
                raise DataError(f"{conv.source}: {e}") from e
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "image": image}


def collate(samples: list, pad_id: int) -> dict:
    """Pad on the right into a batch (format at the top of this file); "skipped" counts the None samples."""
    kept = [s for s in samples if s is not None]
    B, T = len(kept), max((len(s["input_ids"]) for s in kept), default=0)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long),
             "attention_mask": torch.zeros((B, T), dtype=torch.long),
             "images": None, "skipped": len(samples) - B}
    for b, s in enumerate(kept):
        n = len(s["input_ids"])
        batch["input_ids"][b, :n] = s["input_ids"]
        batch["labels"][b, :n] = s["labels"]
        batch["attention_mask"][b, :n] = 1
    pictures = [s["image"] for s in kept if s["image"] is not None]
    if pictures:  # one picture per conversation; a sample without one gets zeros (it has no <image> token)
        batch["images"] = torch.zeros((B, 1, *pictures[0].shape), dtype=pictures[0].dtype)
        for b, s in enumerate(kept):
            if s["image"] is not None:
                batch["images"][b, 0] = s["image"]
    return batch


class Stream:
    """An endless stream of batches for one DDP rank, resumable from a sample position.

    The global order is a permutation per epoch (seeded by seed, salt and epoch), repeated epoch after epoch;
    with group_window > 0 each window of that many positions is sorted by length to cut padding. Rank r of W
    takes the positions p >= start with (p - start) % W == r; each batch takes its next batch_size of them. So
    each step covers global positions [start + s*G, start + (s+1)*G), G = batch_size * W, whatever W is: two
    ranks with accumulation k see exactly what one rank with accumulation 2k sees (batch_size 1).
    `position` counts the global samples consumed: it advances by G per batch taken from the iterator (so take
    only what is trained on: itertools.islice(stream, n), not zip(stream, range(n)), which takes one more).
    With skip_bad, a batch that lost samples to unreadable pictures is smaller (None when it lost all);
    `skipped` counts them.
    """

    def __init__(self, dataset: InstructionDataset, *, batch_size: int = 1, seed: int = 0, salt: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, group_window: int = 0):
        if len(dataset) == 0:
            raise DataError("no samples to stream")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.dataset, self.batch_size, self.seed, self.salt = dataset, batch_size, seed, salt
        self.rank, self.world_size, self.num_workers, self.group_window = rank, world_size, num_workers, group_window
        self.position, self.skipped = 0, 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank that one pass over the dataset gives (the tail is carried into the next epoch)."""
        return len(self.dataset) // (self.batch_size * self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        """The global order of dataset indices in `epoch`."""
        if epoch not in self._orders:
            self._orders = {epoch: self._make_order(epoch)}   # keep one epoch: positions only move forward
        return self._orders[epoch]

    def _make_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.salt, epoch]).permutation(len(self.dataset))
        if self.group_window > 1:
            lengths = np.asarray(self.dataset.lengths)
            for w in range(0, len(order), self.group_window):
                window = order[w:w + self.group_window]
                order[w:w + self.group_window] = window[np.argsort(lengths[window], kind="stable")]
        return order

    def index(self, position: int) -> int:
        """The dataset index at a global position."""
        epoch, offset = divmod(position, len(self.dataset))
        return int(self.order(epoch)[offset])

    def batch_indices(self, start: int):
        """This rank's batches of dataset indices, from global position `start` on (endless)."""
        step = self.batch_size * self.world_size
        while True:
            yield [self.index(start + self.rank + k * self.world_size) for k in range(self.batch_size)]
            start += step

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.batch_indices(self.position), num_workers=self.num_workers,
            collate_fn=partial(collate, pad_id=self.dataset.tokenizer.pad_id))
        for batch in loader:
            self.position += self.batch_size * self.world_size
            self.skipped += batch.pop("skipped")
            yield batch if len(batch["input_ids"]) else None

    def state_dict(self) -> dict:
        return {"position": self.position, "size": len(self.dataset), "seed": self.seed, "salt": self.salt,
                "group_window": self.group_window}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for k in ("size", "seed", "salt", "group_window"):
            if state[k] != mine[k]:
                raise ValueError(f"cannot resume: the stream's {k} was {state[k]}, now {mine[k]} (other data?)")
        self.position = state["position"]


def train_streams(mix: Mix, tokenizer, image_transform, *, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                  seed: int = 0, max_len: int = 512, num_workers: int = 0, group_window: int = 0,
                  skip_bad: bool = False) -> tuple[Stream | None, Stream | None]:
    """The vision-language stream and the independently cycled language-only stream (None where a mix has none).
    Each training iteration takes one batch of each (the paper's recipe)."""
    def stream(convs, salt):
        if not convs:
            return None
        return Stream(InstructionDataset(convs, tokenizer, image_transform, max_len, skip_bad), batch_size=batch_size,
                      seed=seed, salt=salt, rank=rank, world_size=world_size, num_workers=num_workers,
                      group_window=group_window)
    return stream(mix.vl, 0), stream(mix.lang, 1)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def _marked(conv: Conversation, tokenizer, max_len: int) -> str:
    """prompt(conv) with the characters of the loss tokens between « and », cut where truncation cuts."""
    text = prompt(conv)
    ids, spans = tokenizer.encode_spans(text)
    rendered = render(conv, tokenizer, max_len)
    if rendered is None:
        return text + "\n[dropped: no answer token within max_len]"
    labels = rendered[1]
    out, pos, inside = [], 0, False
    for label, (s, e) in zip(labels, spans):
        if (label != -100) != inside:
            out.append(text[pos:s] + ("«" if not inside else "»"))
            pos, inside = s, not inside
    end = spans[len(labels) - 1][1]
    out.append(text[pos:end] + ("»" if inside else ""))
    return "".join(out) + (f"\n[truncated to {max_len} tokens]" if len(ids) > max_len else "")


def _release_tokenizer() -> str:
    """tokenizer.model of the LLaMA directory where the MultiModal-GPT README puts it."""
    from checkpoints import RELEASE
    return os.path.join(RELEASE["llama"], "tokenizer.model")


def _tokenizer(path: str | None, mix: Mix):
    from tokenizer import Tokenizer
    if path is None and "demo" in mix.counts and len(mix.counts) <= 2:
        import demo
        print("(a demo tokenizer, trained on demo.corpus() for this run)")
        with tempfile.TemporaryDirectory() as tmp:
            return Tokenizer(demo.tokenizer(os.path.join(tmp, "demo")))
    path = path or _release_tokenizer()
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no tokenizer model (give --tokenizer PATH)")
    import checkpoints
    try:
        return checkpoints.read_tokenizer(path)
    except checkpoints.CheckpointError as e:
        raise SystemExit(str(e)) from None


def _show(mix: Mix, args):
    tokenizer = _tokenizer(args.tokenizer, mix)
    groups = [g for g in (mix.vl, mix.lang) if g]
    orders = [np.random.default_rng([args.seed, salt, 0]).permutation(len(g)) for salt, g in enumerate(groups)]
    for n in range(args.show):   # alternate vision-language and language-only, as training iterations do
        g = n % len(groups)
        conv = groups[g][orders[g][(n // len(groups)) % len(groups[g])]]
        print(f"==== sample {n} ({conv.source}{', picture ' + conv.image if conv.image else ''})")
        print(_marked(conv, tokenizer, args.max_len))
    _summary(mix, tokenizer, args.max_len)


def _summary(mix: Mix, tokenizer, max_len: int, bad_pictures: int = 0):
    print("\nconversations per source:")
    for name, n in mix.counts.items():
        print(f"  {name:16s} {n}")
    print(f"  vision-language {len(mix.vl)}, language-only {len(mix.lang)}")
    if tokenizer is not None:
        for name, convs in (("vision-language", mix.vl), ("language-only", mix.lang)):
            if convs:
                lengths = [sample_length(c, tokenizer, max_len) for c in convs]
                kept = [n for n in lengths if n is not None]
                print(f"  {name}: {len(lengths) - len(kept)} dropped (no answer token within {max_len} tokens), "
                      f"{sum(n == max_len for n in kept)} truncated, mean {np.mean(kept or [0]):.0f} tokens")
    print(f"bad records or missing pictures skipped: {len(mix.errors)}; unreadable pictures: {bad_pictures}")


def _check(mix: Mix, args) -> int:
    from tqdm import tqdm
    bad = []
    for conv in tqdm(mix.vl, desc="pictures", unit="pic"):
        try:
            load_image(conv.image)
        except DataError as e:
            bad.append(f"{conv.source}: {e}")
    for e in [str(e) for e in mix.errors] + bad:
        print("error:", e)
    tokenizer = None
    if args.tokenizer or "demo" in mix.counts or os.path.isfile(_release_tokenizer()):
        tokenizer = _tokenizer(args.tokenizer, mix)
    _summary(mix, tokenizer, args.max_len, len(bad))
    return 1 if mix.errors or bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Show or check the training data that a config describes.")
    ap.add_argument("config", help="data config JSON (see the top of data.py)")
    ap.add_argument("--show", type=int, metavar="N", help="print N rendered samples, loss-bearing text in « »")
    ap.add_argument("--check", action="store_true", help="validate every annotation and picture, print a summary")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad records and pictures, counted, not fail")
    ap.add_argument("--tokenizer", help="sentencepiece model (default: checkpoints/llama-7b_hf/tokenizer.model; "
                                        "for a demo-only config, one trained on the demo corpus)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed for --show")
    args = ap.parse_args(argv)
    if args.show is None and not args.check:
        ap.error("give --show N or --check")
    try:
        # --check lists every problem rather than stopping at the first.
        mix = load_mix(args.config, skip_bad=args.skip_bad or args.check)
    except DataError as e:
        print(f"error: {e}\n(--skip-bad skips bad records and pictures, --check lists them all)", file=sys.stderr)
        return 1
    status = 0
    if args.show is not None:
        _show(mix, args)
    if args.check:
        status = _check(mix, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
