"""Score a model on the standard vision-language benchmarks, read in the formats people download them in.

    python eval.py --task vqav2 --questions v2_OpenEnded_mscoco_val2014_questions.json \\
                   --annotations v2_mscoco_val2014_annotations.json --images val2014 --ckpt runs/mmgpt
    python eval.py --task coco --annotations coco_karpathy_test.json --images COCO_ROOT    (release: checkpoints/)
    python eval.py --task okvqa ... --shots 4 --support-questions TRAIN_Q.json --support-annotations TRAIN_A.json \\
                   --support-images train2014                                            (OpenFlamingo's few-shot form)
    python eval.py --task demo --ckpt runs/demo          the built-in demo: the number train.py's evaluation reports

Tasks (--annotations FILE, --images DIR; the picture of each record is looked up as shown):
  vqav2, okvqa  --questions {"data_subtype", "questions": [{"image_id", "question", "question_id"}]} and
                {"annotations": [{"question_id", "answers": [{"answer"} x 10]}]}; DIR/COCO_{data_subtype}_{id:012d}.jpg
  textvqa       {"data": [{"question_id", "image_id", "question", "answers": [10 texts]}]}; DIR/{image_id}.jpg
  vizwiz        [{"image", "question", "answers": [{"answer"} x 10]}]; DIR/{image}
  coco          LAVIS's Karpathy split [{"image", "caption": [...]}], or Karpathy's dataset_coco.json
                {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]} (--split); DIR/{image}
  flickr30k     the same two layouts (LAVIS's flickr30k_test.json, Karpathy's dataset_flickr30k.json)
  aokvqa        [{"question_id", "image_id", "split", "question", "choices", "correct_choice_idx", "direct_answers",
                "difficult_direct_answer"}]; DIR/{split}2017/{image_id:012d}.jpg; each question is asked twice,
                choices shown (multiple choice) and not (direct answer)
  demo          demo.eval_set (as train.py draws it for --seed), scored by demo.score

Read top-down:
  Item, readers            a benchmark's files -> items (picture, question, reference answers); DataError names the
                           file, record and field
  metrics                  the official scorers' own: VQA accuracy as vqaEval.py (per answer and question type too),
                           CIDEr-D and BLEU-4 as pycocoevalcap, A-OKVQA's multiple-choice and direct-answer accuracy
  prompts, answers         the paper's template (zero-shot) or OpenFlamingo's few-shot form; the post-processing that
                           makes the submitted answer (--answer-processor: openflamingo, evalai)
  generate, main           greedy answers (engine.py, --batch-size slots), predictions JSONL and summary JSON
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import conversation
import data
import demo
import options
from engine import Engine, Request, Sampling

VQA_TASKS = ("vqav2", "okvqa", "textvqa", "vizwiz")
CAPTION_TASKS = ("coco", "flickr30k")
TASKS = VQA_TASKS + CAPTION_TASKS + ("aokvqa", "demo")
# Zero-shot instructions on the paper's template ({question} is the benchmark's question). VQA wants one or two
# words: the instruction says so (LLaVA-1.5's wording). The caption instruction is one of the caption questions
# MultiModal-GPT was trained with (data.CAPTION_QUESTIONS), the one that asks for a single sentence. A-OKVQA is
# asked as MultiModal-GPT was trained on it (choices as the "### Input:"), which it answers "The answer is X. ...".
INSTRUCTIONS = {"vqa": "{question} Answer the question using a single word or phrase.",
                "caption": "How would you briefly summarize the content of this image in a phrase or sentence?",
                "aokvqa": "{question}", "demo": "{question}"}
MAX_NEW_TOKENS = {"vqa": 16, "caption": 40, "aokvqa": 24, "demo": 12}   # demo: train.py's evaluation


@dataclass
class Item:
    id: str                                 # what the predictions name: the question id, or the picture (captions)
    image: str                              # picture path
    question: str | None                    # None: a caption is asked for
    references: list[str]                   # the human answers, or the reference captions
    where: str = field(default="", compare=False)   # file and record, for messages
    choices: list[str] | None = None        # A-OKVQA multiple choice: shown with the question
    correct: int | None = None              # index of the right choice
    earlier: list = field(default_factory=list)     # demo: answered turns about the same picture, asked first
    answer_type: str | None = None          # VQAv2, OK-VQA, VizWiz: the annotation's ("yes/no", "number", "other")
    question_type: str | None = None        # VQAv2, OK-VQA: the annotation's ("what color", "how many", ...)


def kind(task: str) -> str:
    return "vqa" if task in VQA_TASKS else "caption" if task in CAPTION_TASKS else task


# ----------------------------------------------------------------------------------------------------------------
# Readers. Field access and its messages are data.py's (data.get_field, text_field, ...): one wording for every bad record.

def _load_json(path: str):
    text = data.read_text(path)     # missing, empty, not UTF-8: named as for training data
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise data.DataError(f"{path} line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None


def _records(path: str, key: str | None, content=None) -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON file (its content when already read): a list (key None) or an
    object holding one under `key`."""
    content = _load_json(path) if content is None else content
    if key is not None:
        if not isinstance(content, dict) or key not in content:
            raise data.DataError(f"{path}: missing field '{key}' (expected {{\"{key}\": [...]}})")
        content = content[key]
    if not isinstance(content, list):
        raise data.DataError(f"{path}: {f'field {key!r}' if key else 'the file'}: expected a list of records, "
                             f"got {type(content).__name__}")
    return [(f"{path} {key or 'record'}[{i}]", rec) for i, rec in enumerate(content)]


def _answers(rec, name: str, where: str) -> list[str]:
    """The human answers: a list of texts (TextVQA, A-OKVQA) or of {"answer": text} (VQAv2, OK-VQA, VizWiz).
    An answer may be empty: crowd answers sometimes are, and it still counts as one of the n."""
    value = data.get_field(rec, name, where)
    if not isinstance(value, list) or not value:
        raise data.DataError(f"{where}: field '{name}': expected a non-empty list")
    return [data.as_text(data.get_field(a, "answer", f"{where} {name}[{j}]") if isinstance(a, dict) else a,
                          f"{name}[{j}]", where, empty_ok=True) for j, a in enumerate(value)]


def _optional_text(rec, name: str, where: str) -> str | None:
    return data.text_field(rec, name, where) if name in rec else None


def _int(rec, name: str, where: str) -> int:
    value = data.get_field(rec, name, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise data.DataError(f"{where}: field '{name}': expected an integer, got {type(value).__name__}")
    return value


def read_vqa(questions: str, annotations: str, images: str) -> list[Item]:
    """VQAv2 / OK-VQA: the questions file and the annotations file, joined on question_id. The annotations'
    answer_type and question_type are kept for the breakdowns vqaEval.py reports."""
    answers = {}
    for where, rec in _records(annotations, "annotations"):
        answers[_int(rec, "question_id", where)] = (_answers(rec, "answers", where),
                                                    _optional_text(rec, "answer_type", where),
                                                    _optional_text(rec, "question_type", where))
    content = _load_json(questions)
    subtype = content.get("data_subtype", "val2014") if isinstance(content, dict) else "val2014"
    items = []
    for where, rec in _records(questions, "questions", content):
        qid = _int(rec, "question_id", where)
        if qid not in answers:
            raise data.DataError(f"{where}: question_id {qid} has no annotation in {annotations}")
        path = os.path.join(images, f"COCO_{subtype}_{_int(rec, 'image_id', where):012d}.jpg")
        refs, answer_type, question_type = answers[qid]
        items.append(Item(str(qid), path, data.text_field(rec, "question", where), refs, where,
                          answer_type=answer_type, question_type=question_type))
    return items


def read_textvqa(annotations: str, images: str) -> list[Item]:
    items = []
    for where, rec in _records(annotations, "data"):
        path = os.path.join(images, data.text_field(rec, "image_id", where) + ".jpg")
        items.append(Item(data.text_field(rec, "question_id", where), path, data.text_field(rec, "question", where),
                          _answers(rec, "answers", where), where))
    return items


def read_vizwiz(annotations: str, images: str) -> list[Item]:
    """VizWiz has no question ids: a question is named by its picture."""
    items = []
    for where, rec in _records(annotations, None):
        image = data.text_field(rec, "image", where)
        items.append(Item(image, os.path.join(images, image), data.text_field(rec, "question", where),
                          _answers(rec, "answers", where), where,
                          answer_type=_optional_text(rec, "answer_type", where)))
    return items


def read_captions(annotations: str, images: str, split: str = "test") -> list[Item]:
    """LAVIS's Karpathy-split files (a list of {"image", "caption": text or [texts]}) or Karpathy's own
    dataset_*.json ({"images": [...]}, the records of `split`)."""
    content = _load_json(annotations)
    items = []
    if isinstance(content, dict) and "images" in content:
        for where, rec in _records(annotations, "images", content):
            if data.text_field(rec, "split", where) != split:
                continue
            name = os.path.join(data.text_field(rec, "filepath", where) if "filepath" in rec else "",
                                data.text_field(rec, "filename", where))
            sentences = data.get_field(rec, "sentences", where)
            if not isinstance(sentences, list) or not sentences:
                raise data.DataError(f"{where}: field 'sentences': expected a non-empty list")
            refs = [data.text_field(s, "raw", f"{where} sentences[{j}]") for j, s in enumerate(sentences)]
            items.append(Item(name, os.path.join(images, name), None, refs, where))
        if not items:
            raise data.DataError(f"{annotations}: no image has split {split!r} (--split)")
        return items
    for where, rec in _records(annotations, None, content):
        name = data.text_field(rec, "image", where)
        items.append(Item(name, os.path.join(images, name), None, data.texts_field(rec, "caption", where, single_ok=True),
                          where))
    return items


def read_aokvqa(annotations: str, images: str) -> list[Item]:
    """Each question twice: with its choices (multiple choice) and, unless marked difficult_direct_answer (which
    the official evaluation leaves out of that setting), without (direct answer)."""
    items = []
    for where, rec in _records(annotations, None):
        qid, question = data.text_field(rec, "question_id", where), data.text_field(rec, "question", where)
        choices = data.texts_field(rec, "choices", where)
        correct = _int(rec, "correct_choice_idx", where)
        if not 0 <= correct < len(choices):
            raise data.DataError(f"{where}: field 'correct_choice_idx': {correct} is not an index into the "
                                 f"{len(choices)} choices")
        direct = _answers(rec, "direct_answers", where)
        split, image_id = data.text_field(rec, "split", where), _int(rec, "image_id", where)
        path = os.path.join(images, f"{split}2017", f"{image_id:012d}.jpg")
        items.append(Item(f"{qid}:mc", path, question, [choices[correct]], where, choices, correct))
        if data.get_field(rec, "difficult_direct_answer", where) is not True:
            items.append(Item(f"{qid}:da", path, question, direct, where))
    return items


def read_demo(seed: int) -> list[Item]:
    """The held-out items train.py scores a demo run trained with --seed `seed` on (its pictures drawn as files)."""
    items = []
    for i, (conv, expected) in enumerate(demo.eval_set(n=200, seed=seed + 1, pictures=demo.PICTURES)):
        items.append(Item(str(i), conv.image, conv.turns[-1].question, [expected], f"demo item {i}",
                          earlier=conv.turns[:-1]))
    return items


def read(task: str, questions: str | None, annotations: str | None, images: str | None, split: str = "test",
         seed: int = 0) -> list[Item]:
    if task == "demo":
        return read_demo(seed)
    if task in ("vqav2", "okvqa"):
        return read_vqa(questions, annotations, images)
    if task == "textvqa":
        return read_textvqa(annotations, images)
    if task == "vizwiz":
        return read_vizwiz(annotations, images)
    if task in CAPTION_TASKS:
        return read_captions(annotations, images, split)
    return read_aokvqa(annotations, images)


# ----------------------------------------------------------------------------------------------------------------
# Metrics: the official scorers' own definitions, applied to the submitted answer as it is (turning what the model
# wrote into that answer is post-processing, below with the prompts, and named in the summary: it moves the number)

# vqaEval.py's answer normalisation (GT-Vision-Lab's, also OpenFlamingo's vqa_metric.py and EvalAI's processor). Its
# contraction table's capitalised keys ("Im", "Ive", "Id've", "I'dve") never match the lower-cased words it is applied
# to, and its identity entries ("let's", "she's") change nothing: both are left out.
CONTRACTIONS = dict(pair.split(">") for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've couldnt've>couldn't've
    didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't
    havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's
    isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll maam>ma'am mightnt>mightn't
    mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't
    notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't
    shed've>she'd've she'dve>she'd've shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've
    shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've
    somebodyll>somebody'll somebodys>somebody's someoned>someone'd someoned've>someone'd've
    someone'dve>someone'd've someonell>someone'll someones>someone's somethingd>something'd
    somethingd've>something'd've something'dve>something'd've somethingll>something'll thats>that's
    thered>there'd thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd
    theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't
    wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're whats>what's
    whatve>what've whens>when's whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've
    who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't
    wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll
    y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
    you'dve>you'd've youll>you'll youre>you're youve>you've""".split())
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_IN_NUMBER = re.compile(r"\d,\d")
PERIOD = re.compile(r"\.(?!\d)")   # the official pattern, "(?!<=\d)(\.)(?!\d)", means this: keeps "2.5"'s period


def normalise_answer(text: str) -> str:
    """vqaEval.py's processPunctuation then processDigitArticle: punctuation removed where it touches a space or the
    text holds a number like "1,000", else made a space; periods not before a digit dropped; lower case, number words
    to digits, articles dropped, contractions restored. "Two" -> "2", "a dog" -> "dog", "dont" -> "don't"."""
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text)) else " ")
    # vqaEval.py passes re.UNICODE (32) where sub() takes its count: only the first 32 periods go.
    words = [NUMBERS.get(w, w) for w in PERIOD.sub("", out, count=32).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def one_line(text: str) -> str:
    """What every official VQA scorer first does to an answer: tabs and newlines made spaces, the ends stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(answer: str, references: list[str]) -> float:
    """vqaEval.py's accuracy of a submitted answer, as its latest version and OpenFlamingo 0.0.2's vqa_metric.py
    compute it (OpenFlamingo 2.0's normalises always): min(1, humans among the other n-1 who gave it / 3), averaged
    over the n leave-one-out subsets. Only when the humans disagree are their answers and the submitted one
    normalised; unanimous ones are compared as written: "Yes." scores 0 against ten "yes", "a dog" 1 against ten
    "a dog"."""
    answer, refs = one_line(answer), [one_line(r) for r in references]
    if len(set(refs)) > 1:
        answer, refs = normalise_answer(answer), [normalise_answer(r) for r in refs]
    matches = sum(r == answer for r in refs)
    return sum(min(1.0, (matches - (r == answer)) / 3) for r in refs) / len(refs)


def per_type(scores: list[float], types: list[str | None]) -> dict[str, float]:
    """vqaEval.py's perAnswerType / perQuestionType: the mean score (x 100) of the items of each type (items without
    one left out); empty when the annotations carry none."""
    groups = {}
    for s, t in zip(scores, types, strict=True):
        if t is not None:
            groups.setdefault(t, []).append(s)
    return {t: 100 * sum(g) / len(g) for t, g in groups.items()}


# CIDEr-D and BLEU-4 as pycocoevalcap computes them, on the tokens its tokenizer makes: Stanford CoreNLP 3.4.1's
# PTBTokenizer (Java) run with -lowerCase, then the tokens of its PUNCTUATIONS list dropped. tokenize reproduces the
# rules captions meet, found by running the Java on generated captions (README, Metrics, has the measurement).
PTB_CHARS = str.maketrans({"‘": "`", "’": "'", "“": '"', "”": '"', "«": '"', "»": '"', "—": " -- ", "–": " -- ",
                           "…": " ... ", "½": " 1/2 ", "¼": " 1/4 ", "¾": " 3/4 ", "⅓": " 1/3 ", "⅔": " 2/3 "})
# pycocoevalcap's list as the tokens here come ('"' is what the Java writes as `` or ''). The list names brackets in
# upper case (-LRB-) while the tokens are lower-cased, so brackets stay, as -lrb- and so on.
PTB_DROPPED = {'"', "''", "'", "``", "`", ".", "?", "!", ",", ":", ";", "-"}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
PTB_SPLITS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
              "gimme": ["gim", "me"], "lemme": ["lem", "me"]}
# The abbreviations, of those tried, whose period the Java keeps ("no.", "approx.", "fig.", "sat." lose theirs).
PTB_ABBREVIATIONS = ("mr|mrs|ms|dr|st|jr|sr|co|inc|ltd|corp|vs|etc|ave|blvd|rd|lt|ft|sgt|gen|col|capt|prof|rev|gov|sen|"
                     "rep|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|wed|thu|fri|mt|dept|est|bros|assn|"
                     "univ|calif")
TOKEN = re.compile(
    r"\w+(?=n't\b)|n't\b"                                   # do n't, ca n't
    r"|''|``"                                               # quotes, as one token
    r"|'(?:s|m|d|ll|re|ve|em)\b(?!\.\w)|'t(?=(?:is|was)\b)"  # 's 'll 'em, 't is: else ' is a quote...
    r"|'\d\ds\b|'\d\d(?=[.,;!?]*(?:\s|$))"                 # ... or begins a decade or year: '90s, '95
    r"|(?<!\w)y'(?=\w)"                                     # y' all
    r"|(?<![\w.])[a-z](?:\.[a-z])*\.(?!\w)|(?<!\w)[a-z](?:\.[a-z])+"   # u.s., a.m., e.g., the letter c.
    rf"|(?<!\w)(?:{PTB_ABBREVIATIONS})\.|(?<!\w)no\.(?=\s*\d)"  # mr., st., etc., no. 5
    r"|\d+(?:[.,:/]\d+)+|(?<![\w.])\.\d+"                   # 2.5, 1,000, 12:45, 1/2, .5
    r"|[@#][a-z_]+"                                         # @home, #dog (but # 1)
    r"|\w+'(?!(?:s|m|d|ll|re|ve)\b)\w+"                     # o'clock, ma'am
    r"|\w+(?:[-/]\w+)*"                                     # black-and-white, and/or
    r"|[?!]{2,}|[^\w\s]")                                   # "?!" one token (kept); any other symbol alone


def tokenize(text: str) -> list[str]:
    """The words pycocoevalcap scores a caption by (TOKEN's comments show them). Left out, as rare in captions: a
    letter's period before a word that starts sentences ("A. The" -> a), runs of three quote marks, a quoted "_",
    abbreviations outside PTB_ABBREVIATIONS, e-mail addresses, emoticons, "C++", "AT&T", "rock'n'roll"."""
    words = []
    for t in TOKEN.findall(text.translate(PTB_CHARS).lower()):
        if t not in PTB_DROPPED:
            words += PTB_SPLITS.get(t) or [PTB_BRACKETS.get(t, t)]
    return words


def ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """Each candidate's CIDEr-D (the corpus score is their mean): for n = 1..4, the cosine of tf-idf n-gram vectors
    with the candidate's weights clipped at the reference's, times exp(-(length difference)^2 / (2 sigma^2)),
    averaged over n and over the references, times 10. Document frequencies come from the references of the
    evaluated set. As pycocoevalcap, the "length" is the number of bigrams (words - 1)."""
    cands = [ngrams(tokenize(c), n) for c in candidates]
    refs = [[ngrams(tokenize(r), n) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_images = math.log(len(refs))

    def vector(counts):
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for g, tf in counts.items():
            vec[len(g) - 1][g] = w = tf * (log_images - math.log(max(1.0, df[g])))
            norm[len(g) - 1] += w * w
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        vc, nc, lc = vector(cand)
        total = 0.0
        for ref in rs:
            vr, nr, lr = vector(ref)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                total += (dot / (nc[k] * nr[k]) if nc[k] and nr[k] else 0.0) * penalty
        scores.append(total / n / len(rs) * 10.0)
    return scores


def bleu(candidates: list[str], references: list[list[str]], n: int = 4) -> float:
    """Corpus BLEU-n: clipped n-gram precisions (clipped at the most any one reference holds), their geometric mean,
    the brevity penalty against each candidate's closest reference length; pycocoevalcap's 1e-15/1e-9 guards."""
    correct, guess, cand_len, ref_len = [0] * n, [0] * n, 0, 0
    for cand, rs in zip(candidates, references, strict=True):
        words, ref_words = tokenize(cand), [tokenize(r) for r in rs]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        most = Counter()
        for r in ref_words:
            most |= ngrams(r, n)    # | keeps the larger count of each n-gram
        for g, c in ngrams(words, n).items():
            correct[len(g) - 1] += min(c, most[g])
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    precision = math.prod((c + 1e-15) / (g + 1e-9) for c, g in zip(correct, guess)) ** (1 / n)
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    return precision * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def aokvqa_direct(answer: str, direct_answers: list[str]) -> float:
    """A-OKVQA's direct-answer accuracy (eval_predictions.py): min(1, direct answers equal to the submitted string
    / 3), compared as written, no leave-one-out."""
    return min(1.0, sum(answer == d for d in direct_answers) / 3)


def aokvqa_choice(answer: str, choices: list[str], correct: int) -> float:
    """A-OKVQA's multiple-choice accuracy (eval_predictions.py): 1 when the submitted string is the right choice's."""
    return float(answer == choices[correct])


def score(task: str, items: list[Item], answers: list[str]) -> tuple[list[float], dict, dict]:
    """Per-item scores (in the metric's own scale), the summary (benchmarks x 100, as papers print them; the demo as
    train.py reports it) and the VQA breakdowns by answer and question type (x 100) where the annotations have them."""
    if task == "demo":
        per_item = [float(demo.answer_matches(a, it.references[0])) for it, a in zip(items, answers)]
        return per_item, demo.score([it.references[0] for it in items], answers), {}
    if task in VQA_TASKS:
        per_item = [vqa_accuracy(a, it.references) for it, a in zip(items, answers)]
        breakdown = {"per_answer_type": per_type(per_item, [it.answer_type for it in items]),
                     "per_question_type": per_type(per_item, [it.question_type for it in items])}
        return per_item, {"accuracy": 100 * sum(per_item) / len(items)}, {k: v for k, v in breakdown.items() if v}
    if task in CAPTION_TASKS:
        per_item = cider_d(answers, [it.references for it in items])
        return per_item, {"CIDEr": 100 * sum(per_item) / len(items),
                          "BLEU-4": 100 * bleu(answers, [it.references for it in items])}, {}
    per_item = [aokvqa_choice(a, it.choices, it.correct) if it.choices else aokvqa_direct(a, it.references)
                for it, a in zip(items, answers)]
    out = {}
    for name, mc in (("mc_accuracy", True), ("da_accuracy", False)):
        s = [x for x, it in zip(per_item, items) if (it.choices is not None) == mc]
        if s:
            out[name] = 100 * sum(s) / len(s)
    return per_item, out, {}


# ----------------------------------------------------------------------------------------------------------------
# Prompts and answers

def zero_shot_prompt(item: Item, instruction: str) -> str:
    """The paper's template, as the MultiModal-GPT release was trained (A-OKVQA's choices as its "### Input:")."""
    question = instruction.format(question=item.question)
    turn = conversation.Turn(question, "", ", ".join(item.choices) if item.choices else "")
    return conversation.prompt(conversation.Conversation(item.image, [*item.earlier, turn]), open_last=True)


def flamingo_block(item: Item, answer: str | None) -> str:
    """OpenFlamingo's few-shot form: `<image>Question:{q} Short answer:{a}<|endofchunk|>`, captions
    `<image>Output:{caption}<|endofchunk|>`; the query's block ends where the model writes."""
    end = "" if answer is None else f"{answer}<|endofchunk|>"
    if item.question is None:
        return f"<image>Output:{end}"
    question = item.question + (f" Choices: {', '.join(item.choices)}." if item.choices else "")
    return f"<image>Question:{question} Short answer:{end}"


def shot_answer(item: Item) -> str:
    """What a support example shows as its answer: the right choice, the first reference caption, or the answer
    most humans gave (the first of them on a tie)."""
    if item.choices:
        return item.choices[item.correct]
    return item.references[0] if item.question is None else Counter(item.references).most_common(1)[0][0]


def pools(support: list[Item]) -> dict[bool, list[Item]]:
    """The support examples by setting (True: multiple choice), split once: A-OKVQA's two never mix."""
    return {mc: [s for s in support if (s.choices is not None) == mc] for mc in (False, True)}


def draw_shots(item: Item, support: dict[bool, list[Item]], shots: int, seed: int) -> list[Item]:
    """`shots` examples of the item's setting (support: pools()), other than the item itself, drawn with a generator
    seeded by (seed, item id): the same prompt whatever --limit, --batch-size or the item's position."""
    pool = support[item.choices is not None]
    rng = random.Random(f"{seed}:{item.id}")
    picked = [pool[i] for i in rng.sample(range(len(pool)), min(len(pool), shots + 1))]
    picked = [s for s in picked if s.id != item.id][:shots]
    if len(picked) < shots:
        raise data.DataError(f"the support set has {len(pool)} examples of this kind; --shots {shots} needs "
                             f"{shots} besides the item itself")
    return picked


def prompt_and_pictures(item: Item, support: dict[bool, list[Item]], shots: int, fmt: str, instruction: str,
                        seed: int) -> tuple[str, list[str]]:
    if fmt == "paper":
        return zero_shot_prompt(item, instruction), [item.image]
    examples = draw_shots(item, support, shots, seed) if shots else []
    text = "".join(flamingo_block(s, shot_answer(s)) for s in examples) + flamingo_block(item, None)
    return text, [s.image for s in examples] + [item.image]


# Post-processing: what the model wrote -> the answer submitted to the metric. Short answers go through a processor
# named by --answer-processor (and in the summary), each one published pipeline as it stands.
NEXT_BLOCK = re.compile("Question|Answer")


def openflamingo_answer(text: str) -> str:
    """OpenFlamingo's evaluation as released with the OpenFlamingo-9B that MultiModal-GPT starts from (open_flamingo
    0.0.2, vqa_metric.postprocess_vqa_generation): the text before "Question" or "Answer" (the next few-shot block,
    matched anywhere), nothing else; the metric normalises it where the humans disagree. (For OK-VQA it then stems
    the answer with nltk, which eval.py does not have.)"""
    return NEXT_BLOCK.split(text, maxsplit=1)[0]


def evalai_answer(text: str) -> str:
    """EvalAI's answer processor (mmf's EvalAIAnswerProcessor), which LLaVA runs over its VQAv2 predictions before
    submitting them, on the whole reply: lower case, every "," and "?" removed, "'s" split off (" 's"), then
    vqaEval.py's normalisation."""
    return normalise_answer(one_line(text.lower().replace(",", "").replace("?", "").replace("'s", " 's")))


ANSWER_PROCESSORS = {"openflamingo": openflamingo_answer, "evalai": evalai_answer}

# MultiModal-GPT answers A-OKVQA as it was trained to: "The answer is X. Because ...".
THE_ANSWER_IS = re.compile(r"\s*the answer is\s+(.*?)(?:\.\s|\.?\s*$)", re.IGNORECASE | re.DOTALL)


def choose(answer: str, choices: list[str]) -> int | None:
    """The choice an answer names: the one equal to it after vqaEval.py's normalisation, else the longest one it
    contains as whole words; None when it names none."""
    norm = normalise_answer(answer)
    named = [i for i, c in enumerate(choices) if normalise_answer(c) == norm]
    if not named:
        named = sorted((i for i, c in enumerate(choices) if normalise_answer(c)
                        and f" {normalise_answer(c)} " in f" {norm} "), key=lambda i: -len(choices[i]))
    return named[0] if named else None


def postprocess(task: str, item: Item, text: str, processor: str) -> str:
    """The answer submitted for `item` from what the model wrote (`processor`: a key of ANSWER_PROCESSORS)."""
    if task == "demo":
        return text     # demo.score reads the answer as written, as train.py's evaluation does
    # OpenFlamingo and LLaVA decode skipping special tokens; eval.py's decode writes them out, and </s> is the one an
    # answer can hold (a few-shot answer ends at <|endofchunk|>, the others are never generated).
    text = text.replace("</s>", "")
    if task in CAPTION_TASKS:
        return text.split("Output", 1)[0].replace('"', "")     # OpenFlamingo's caption post-processing
    if task != "aokvqa":
        return ANSWER_PROCESSORS[processor](text)
    # A-OKVQA compares strings as they are: the answer is X of "The answer is X.", stripped; with choices shown, the
    # choice it names, as that choice is written (what it wrote when it names none: scored 0).
    match = THE_ANSWER_IS.match(text)
    answer = ANSWER_PROCESSORS[processor](match[1] if match else text).strip()
    if item.choices is None:
        return answer
    named = choose(answer, item.choices)
    return answer if named is None else item.choices[named]


# ----------------------------------------------------------------------------------------------------------------
# Generation

class Pictures(torch.utils.data.Dataset):
    """Each prompt's pictures, decoded in DataLoader workers while the model writes. A bad picture comes back as
    its DataError (raised in the main process, with its own message)."""

    def __init__(self, paths: list[list[str]], transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return [self.transform(conversation.load_image(p)) for p in self.paths[i]]
        except data.DataError as e:
            return e


def generate(engine: Engine, prompts: list[list[int]], pictures: list[list[str]], transform, *,
             max_new_tokens: int, workers: int = 2) -> list[list[int]]:
    """Greedy answers (ids without the stop token) to every prompt, in order; the engine takes a prompt whenever
    a slot is free (the ids do not depend on what else is decoded beside it). pictures[i]: the picture files of
    prompt i's <image> tokens, decoded by DataLoader workers while the model writes."""
    loader = torch.utils.data.DataLoader(Pictures(pictures, transform), batch_size=None, num_workers=workers)

    def requests():
        for ids, images in zip(prompts, loader):
            if isinstance(images, data.DataError):
                raise images
            yield Request(ids, images, max_tokens=max_new_tokens, sampling=Sampling(greedy=True))

    with tqdm(total=len(prompts), unit="item", dynamic_ncols=True, file=sys.stderr) as bar:
        done = engine.generate(requests(), on_finish=lambda r: bar.update())
    return [r.tokens for r in done]


# ----------------------------------------------------------------------------------------------------------------
# The program

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=TASKS)
    b = ap.add_argument_group("benchmark files")
    b.add_argument("--questions", help="vqav2/okvqa: the questions file")
    b.add_argument("--annotations", help="the annotations file (see the task list above)")
    b.add_argument("--images", help="the folder the task's picture paths are relative to")
    b.add_argument("--split", default="test", help="Karpathy's dataset_*.json: which split (default test)")
    b.add_argument("--limit", type=int, help="score only the first N items (a quick look)")
    p = ap.add_argument_group("prompts")
    p.add_argument("--shots", type=int, default=0, help="few-shot examples per question (OpenFlamingo's form)")
    p.add_argument("--support-questions", help="vqav2/okvqa: questions file of the examples (e.g. train)")
    p.add_argument("--support-annotations", help="annotations file of the examples, in the task's format")
    p.add_argument("--support-images", help="their picture folder (default: --images)")
    p.add_argument("--format", choices=("paper", "flamingo"),
                   help="paper: MultiModal-GPT's instruction template (default with --shots 0); flamingo: "
                        "OpenFlamingo's <image>Question:... Short answer: (default and required with --shots)")
    p.add_argument("--instruction", help="paper format: the instruction, {question} standing for the question "
                                         "(defaults in eval.INSTRUCTIONS)")
    p.add_argument("--answer-processor", choices=tuple(ANSWER_PROCESSORS),
                   help="VQA tasks and aokvqa: how the submitted answer is made from the reply: openflamingo "
                        "(default: as OpenFlamingo's evaluation) or evalai (EvalAI's answer processor, as LLaVA)")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the few-shot examples; for --task demo, the seed the run was trained with")
    w = ap.add_argument_group("weights (as chat.py: none given = checkpoints/ as the release lays it out, "
                              "then runs/demo)")
    options.add_weight_args(w)
    r = ap.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=8, help="questions decoded at once (the engine's slots)")
    r.add_argument("--max-new-tokens", type=int, help=f"default per task: {MAX_NEW_TOKENS}")
    r.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding pictures")
    r.add_argument("--device", help="default: cuda when there is one, else cpu")
    r.add_argument("--out", help="folder for predictions.jsonl and summary.json (default runs/eval/TASK-Kshot)")
    args = ap.parse_args(argv)
    args.format = args.format or ("flamingo" if args.shots else "paper")
    if args.task == "demo" and (args.shots or args.format != "paper"):
        ap.error("--task demo is asked as train.py asks it: no --shots, the paper's template")
    if args.format == "paper" and args.shots:
        ap.error("--shots needs --format flamingo (the paper's template has no few-shot form)")
    if args.answer_processor and kind(args.task) not in ("vqa", "aokvqa"):
        ap.error("--answer-processor is for short answers (the VQA tasks, aokvqa); captions are cut as OpenFlamingo "
                 "does, the demo's answers read as written")
    args.answer_processor = args.answer_processor or ("none" if args.task == "demo" else "openflamingo")
    if args.shots < 0 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--shots must be >= 0, --batch-size and --limit >= 1")
    two_files = args.task in ("vqav2", "okvqa")
    needs = [] if args.task == "demo" else ["annotations", "images"] + (["questions"] if two_files else [])
    if args.shots:
        needs += ["support_annotations"] + (["support_questions"] if two_files else [])
    missing = [f"--{n.replace('_', '-')}" for n in needs if getattr(args, n) is None]
    if missing:
        ap.error(f"--task {args.task} needs {', '.join(missing)}")
    args.out = args.out or os.path.join("runs", "eval", f"{args.task}-{args.shots}shot")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    try:
        items = read(args.task, args.questions, args.annotations, args.images, args.split, args.seed)
        items = items[:args.limit] if args.limit else items
        if not items:
            raise data.DataError(f"{args.questions or args.annotations}: no items to score")
        support = [] if not args.shots else read(args.task, args.support_questions, args.support_annotations,
                                                 args.support_images or args.images, args.split, args.seed)
        for it in items + support:     # before the model loads: a missing picture is found in seconds
            if not os.path.isfile(it.image):
                raise data.DataError(f"{it.where}: picture not found: {it.image}")
        support = pools(support)
        texts, pictures = zip(*(prompt_and_pictures(it, support, args.shots, args.format,
                                                    args.instruction or INSTRUCTIONS[kind(args.task)], args.seed)
                                for it in items))
    except data.DataError as e:
        sys.exit(f"error: {e}")
    device = options.device_of(args)
    model, tokenizer, transform, memory = options.load_model(args, device)
    slots, max_len = options.cache_slots(model, memory, args.batch_size, "--batch-size")
    max_new = args.max_new_tokens or MAX_NEW_TOKENS[kind(args.task)]
    prompts = [tokenizer.encode(t) for t in texts]
    for it, ids in zip(items, prompts):
        if len(ids) + max_new > model.cfg.max_seq_len:
            sys.exit(f"error: {it.where}: the prompt takes {len(ids)} tokens, which with --max-new-tokens "
                     f"{max_new} passes the model's context of {model.cfg.max_seq_len}"
                     + (" (fewer --shots?)" if args.shots else ""))
    # The paper's answers end with </s>; OpenFlamingo's blocks with <|endofchunk|>, which is then allowed.
    eos = tokenizer.eos_id if args.format == "paper" else tokenizer.eoc_id
    banned = [t for t in tokenizer.never_generate if t != eos]
    try:
        engine = Engine(model, tokenizer, slots=slots, max_len=max_len, eos_id=eos, banned=banned)
        outputs = generate(engine, prompts, list(pictures), transform, max_new_tokens=max_new, workers=args.workers)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    written = [tokenizer.decode(ids) for ids in outputs]
    answers = [postprocess(args.task, it, w, args.answer_processor) for it, w in zip(items, written)]
    per_item, metrics, breakdown = score(args.task, items, answers)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "predictions.jsonl"), "w") as f:
        for it, text, w, a, s in zip(items, texts, written, answers, per_item):
            f.write(json.dumps({"id": it.id, "prompt": text, "output": w, "answer": a, "score": s,
                                "references": it.references}) + "\n")
    summary = {"task": args.task, "items": len(items), "shots": args.shots, "format": args.format,
               "answer_processor": args.answer_processor, "metrics": metrics, **breakdown,
               "max_new_tokens": max_new, "batch_size": args.batch_size, "seed": args.seed,
               "weights": {k: getattr(args, k) for k in ("ckpt", "llama", "openflamingo", "lora") if getattr(args, k)},
               "seconds": round(time.time() - started, 1)}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    by_type = breakdown.get("per_answer_type", {})
    print(f"{args.task}, {len(items)} items, {args.shots}-shot ({args.format}), answers {args.answer_processor}: "
          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
          + (f" ({', '.join(f'{t} {v:.4g}' for t, v in by_type.items())})" if by_type else "")
          + f"\npredictions and summary in {args.out}/")
    return summary


if __name__ == "__main__":
    main()
