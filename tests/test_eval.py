"""eval.py: the metrics against hand-computed cases, every reader on tiny files in the real formats (and its bad
input named), prompts, batched == one-at-a-time generation, and --task demo == train.py's evaluation."""
import json
import math
import os
import re
from contextlib import nullcontext

import pytest
from PIL import Image

import conversation
import checkpoints
import data
import demo
import eval
import train
from conftest import tiny_model
from engine import Engine
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def test_official_normalisation_examples():
    assert eval.normalise_answer("Two") == "2"
    assert eval.normalise_answer("a dog") == "dog"
    assert eval.normalise_answer("dont") == "don't"
    assert eval.normalise_answer(" The Yes.\n") == "yes"
    assert eval.normalise_answer("2.5") == "2.5"                        # a period before a digit stays
    assert eval.normalise_answer("1,000") == "1000"                     # a number with a comma: punctuation removed
    assert eval.normalise_answer("black-and-white") == "black and white"  # punctuation between words: a space
    assert eval.normalise_answer("red, white") == "red white"           # punctuation next to a space: removed
    assert eval.normalise_answer("none") == "0"
    assert eval.normalise_answer("Im") == "im"                          # the table's capitalised keys never match
    # vqaEval.py hands re.UNICODE (32) to sub() as its count: the 33rd period on stays.
    assert eval.normalise_answer("a." * 40) == "a" * 32 + "a." * 8


def test_vqa_accuracy_hand_computed():
    # Humans disagree: their answers and the submitted one normalised. "Two" -> "2": each of the three "2" voters
    # leaves 2 matches (2/3), each of the seven others leaves 3 (1): (3 * 2/3 + 7) / 10.
    assert eval.vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # One human agrees: 0 when that one is left out, 1/3 otherwise: 9 * (1/3) / 10.
    assert eval.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert eval.vqa_accuracy("green", ["red"] + ["blue"] * 9) == 0
    # "A dog" -> "dog" matches 2: (2 * 1/3 + 8 * 2/3) / 10.
    assert eval.vqa_accuracy("A dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
    assert eval.vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert eval.vqa_accuracy("dog", ["Dog"] * 9 + ["a dog"]) == 1.0
    # Unanimous humans: nothing normalised, on either side; only tabs, newlines and the ends.
    assert eval.vqa_accuracy("a dog", ["a dog"] * 10) == 1.0
    assert eval.vqa_accuracy("Yes.", ["yes"] * 10) == 0.0
    assert eval.vqa_accuracy("dog", ["a dog"] * 10) == 0.0
    assert eval.vqa_accuracy("dog", ["Dog"] * 10) == 0.0
    assert eval.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert eval.vqa_accuracy("hot\tdog", ["hot dog"] * 10) == 1.0


def test_answer_processors_are_named_steps_that_move_the_number():
    # OpenFlamingo's (v1): the text before "Question" or "Answer", matched anywhere, and nothing else.
    assert eval.openflamingo_answer("Yes.\nQuestion: is it?") == "Yes.\n"
    assert eval.openflamingo_answer("2 Short Answer: 3") == "2 Short "
    assert eval.openflamingo_answer("red, white") == "red, white"
    # EvalAI's: lower case, "," and "?" gone, "'s" split off, then vqaEval.py's normalisation.
    assert eval.evalai_answer("The Dog's bone, 1,000?") == "dog 's bone 1000"
    assert eval.evalai_answer(" Two.\n") == "2"
    assert eval.ANSWER_PROCESSORS == {"openflamingo": eval.openflamingo_answer, "evalai": eval.evalai_answer}
    # Against ten "yes", "Yes." is 0 as OpenFlamingo submits it and 1 as EvalAI's processor submits it.
    vqa = eval.Item("1", "1.jpg", "Is it?", ["yes"] * 10)
    assert [eval.vqa_accuracy(eval.postprocess("vqav2", vqa, "Yes.", p), vqa.references)
            for p in ("openflamingo", "evalai")] == [0.0, 1.0]
    # Both decode as OpenFlamingo and LLaVA do, skipping special tokens (eval.py's decode writes them out).
    assert eval.postprocess("vqav2", vqa, "2</s> dogs", "openflamingo") == "2 dogs"


def test_captions_and_demo_answers_post_processed():
    item = eval.Item("1.jpg", "1.jpg", None, ["A dog."])
    # OpenFlamingo's: the text before "Output", double quotes removed.
    assert eval.postprocess("coco", item, 'A "dog" on a bed.\nOutput: x', "openflamingo") == "A dog on a bed.\n"
    assert eval.postprocess("demo", item, " red </s>", "none") == " red </s>"     # as train.py reads it


def test_aokvqa_exact_matching_and_choices():
    # The official comparison is of strings as they are: no normalisation, no leave-one-out.
    assert eval.aokvqa_direct("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(2 / 3)
    assert eval.aokvqa_direct("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert eval.aokvqa_direct("Red", ["red"] * 10) == 0.0
    choices = ["red", "green apple", "green", "blue"]
    assert eval.aokvqa_choice("green", choices, 2) == 1.0
    assert eval.aokvqa_choice("Green", choices, 2) == 0.0
    # Post-processing: MultiModal-GPT's "The answer is X. Because ..." -> X, then the named processor.
    da = eval.Item("q:da", "x.jpg", "What colour?", ["red"] * 10)
    written = "The answer is Red. Because it is ripe."
    assert [eval.postprocess("aokvqa", da, written, p) for p in ("openflamingo", "evalai")] == ["Red", "red"]
    assert eval.postprocess("aokvqa", da, " The answer is 2.5 meters.", "openflamingo") == "2.5 meters"
    assert eval.postprocess("aokvqa", da, "red\nQuestion: what?", "openflamingo") == "red"
    # Multiple choice: the choice the answer names, as that choice is written; what it wrote when it names none.
    assert eval.choose("Red", choices) == 0
    assert eval.choose("a green apple", choices) == 1        # equal after normalisation
    assert eval.choose("it is green here", choices) == 2     # contained as whole words
    assert eval.choose("purple", choices) is None
    mc = eval.Item("q:mc", "x.jpg", "What colour?", ["green"], choices=choices, correct=2)
    assert eval.postprocess("aokvqa", mc, "The answer is a Green Apple.", "openflamingo") == "green apple"
    assert eval.postprocess("aokvqa", mc, "The answer is purple.", "openflamingo") == "purple"


def test_tokenize_as_the_ptb_tokenizer():
    # Each expected list is what pycocoevalcap 1.2's PTBTokenizer (Stanford CoreNLP 3.4.1, Java) made of the caption.
    assert eval.tokenize('A man (in a hat) [left] {x} said "hi".') == \
        ["a", "man", "-lrb-", "in", "a", "hat", "-rrb-", "-lsb-", "left", "-rsb-", "-lcb-", "x", "-rcb-", "said", "hi"]
    assert eval.tokenize("Mr. Smith's U.S. dog can't, cannot; gonna wanna") == \
        ["mr.", "smith", "'s", "u.s.", "dog", "ca", "n't", "can", "not", "gon", "na", "wan", "na"]
    assert eval.tokenize("It’s a “quote” — dash – 3.5% $10 1,000 e-mail.") == \
        ["it", "'s", "a", "quote", "dash", "3.5", "%", "$", "10", "1,000", "e-mail"]
    assert eval.tokenize("The '90s dog's ball at 12:45pm, 'tis ½ o'clock") == \
        ["the", "'90s", "dog", "'s", "ball", "at", "12:45", "pm", "'t", "is", "1/2", "o'clock"]
    assert eval.tokenize("and/or @home #1 wow?! Vitamin c. No. 5 'ok'") == \
        ["and/or", "@home", "#", "1", "wow", "?!", "vitamin", "c.", "no.", "5", "ok"]
    assert eval.tokenize("he said no. dogs' toys.") == ["he", "said", "no", "dogs", "toys"]


def test_cider_d_hand_computed():
    # Two images: "a" is in both images' references (idf log(2/2) = 0), everything else in one (idf log 2). An exact
    # match then scores 1 on n = 1 and 2 and 0 on n = 3, 4 (no such n-grams): 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert eval.cider_d(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx([5.0, 5.0])
    # "cat" against "a cat": unigram cosine 1 (the weight of "a" is 0), no bigram; lengths (in bigrams) 0 and 1
    # give the Gaussian penalty exp(-1 / (2 * 6^2)).
    assert eval.cider_d(["Cat.", "a dog"], [["a cat"], ["a dog"]]) == \
        pytest.approx([10 * math.exp(-1 / 72) / 4, 5.0])
    # Three images, two references for the first. Against "a cat": 1 (n=1) + 1 (n=2). Against "the cat": unigram
    # vectors {a: 0, cat: l} . {the: l, cat: l} / (l * l sqrt 2) = 1/sqrt 2, no shared bigram. Averaged over the
    # 4 n and the 2 references, times 10.
    score = eval.cider_d(["a cat", "a dog", "a bird"], [["a cat", "the cat"], ["a dog"], ["a bird"]])[0]
    assert score == pytest.approx((2 + 1 / math.sqrt(2)) / 4 / 2 * 10)


def test_bleu4_hand_computed():
    # "the cat sat on the mat" vs "the cat sat on a mat": clipped precisions 5/6, 3/5, 2/4, 1/3, equal lengths.
    assert eval.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx((1 / 12) ** 0.25)
    # A second pair: "a dog sat on the mat" against the closest-length reference (7 words, not 1): 6/6, 4/5, 3/4,
    # 2/3. Corpus counts 11/12, 7/10, 5/8, 3/6; candidate 12 words, references 6 + 7: brevity penalty exp(1 - 13/12).
    got = eval.bleu(["the cat sat on the mat", "A dog sat on the mat."],
                    [["the cat sat on a mat"], ["a dog sat on the red mat", "dog"]])
    assert got == pytest.approx((11 / 12 * 7 / 10 * 5 / 8 * 3 / 6) ** 0.25 * math.exp(1 - 13 / 12))


# ----------------------------------------------------------------------------------------------------------------
# Readers, on tiny files in the real formats

def write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def picture(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def vqa_annotation(qid, image_id, answers, answer_type="other", question_type="what color"):
    """A record of the VQAv2 / OK-VQA annotations file, every field as published."""
    return {"question_type": question_type, "multiple_choice_answer": answers[0], "image_id": image_id,
            "answer_type": answer_type, "question_id": qid,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}


def vqa_files(tmp, n=3):
    questions = {"data_subtype": "val2014",
                 "questions": [{"image_id": 10 + i, "question": f"What colour {i}?", "question_id": 100 + i}
                               for i in range(n)]}
    annotations = {"annotations": [vqa_annotation(100 + i, 10 + i, ["red"] * 6 + ["blue"] * 4) for i in range(n)]}
    for i in range(n):
        picture(str(tmp / "val2014" / f"COCO_val2014_{10 + i:012d}.jpg"), (40 * i, 30, 30))
    return write(tmp / "q.json", questions), write(tmp / "a.json", annotations), str(tmp / "val2014")


def test_vqa_breakdowns_by_answer_and_question_type(tmp_path):
    humans = [(["yes"] * 10, "yes/no", "is the"), (["2"] * 2 + ["3"] * 8, "number", "how many"),
              (["red"] * 10, "other", "what color"), (["blue"] * 2 + ["navy"] * 8, "other", "what color")]
    q = write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": f"Question {i}?", "question_id": i} for i in range(4)]})
    a = write(tmp_path / "a.json", {"annotations": [vqa_annotation(i, i, *h) for i, h in enumerate(humans)]})
    items = eval.read("vqav2", q, a, "val2014")
    per_item, metrics, breakdown = eval.score("vqav2", items, ["yes", "Two", "Red", "blue"])
    # "Two" -> "2", two matches: (2 * 1/3 + 8 * 2/3) / 10; "Red" against unanimous "red": 0; "blue": as "Two".
    assert per_item == pytest.approx([1.0, 0.6, 0.0, 0.6])
    assert metrics == {"accuracy": pytest.approx(55.0)}
    assert breakdown == {"per_answer_type": pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 30.0}),
                         "per_question_type": pytest.approx({"is the": 100.0, "how many": 60.0, "what color": 30.0})}
    textvqa = write(tmp_path / "t.json", {"data": [{"question_id": 7, "image_id": "abc", "question": "Brand?",
                                                    "answers": ["nike"] * 10}]})
    assert eval.score("textvqa", eval.read("textvqa", None, textvqa, "imgs"), ["nike"]) == ([1.0], {"accuracy": 100.0},
                                                                                           {})


def test_readers_in_the_published_formats(tmp_path):
    q, a, images = vqa_files(tmp_path)
    items = eval.read("vqav2", q, a, images)
    assert [(it.id, it.question, it.references[:2]) for it in items[:2]] == \
        [("100", "What colour 0?", ["red", "red"]), ("101", "What colour 1?", ["red", "red"])]
    assert items[0].image == os.path.join(images, "COCO_val2014_000000000010.jpg")

    textvqa = write(tmp_path / "t.json", {"data": [{"question_id": 7, "image_id": "abc", "question": "Brand?",
                                                    "answers": ["nike"] * 10}]})
    [it] = eval.read("textvqa", None, textvqa, "imgs")
    assert (it.id, it.image, it.references[0]) == ("7", os.path.join("imgs", "abc.jpg"), "nike")

    vizwiz = write(tmp_path / "v.json", [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
                                          "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                                          "answerable": 0}])
    [it] = eval.read("vizwiz", None, vizwiz, "imgs")
    assert (it.id, it.references[0]) == ("VizWiz_val_00000000.jpg", "unanswerable")

    lavis = write(tmp_path / "c.json", [{"image": "val2014/COCO_val2014_000000391895.jpg",
                                         "caption": ["A man riding.", "A person on a bike."]}])
    [it] = eval.read("coco", None, lavis, "coco")
    assert (it.id, it.question, it.references) == ("val2014/COCO_val2014_000000391895.jpg", None,
                                                   ["A man riding.", "A person on a bike."])
    karpathy = write(tmp_path / "k.json", {"images": [
        {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "no"}]},
        {"filename": "2.jpg", "split": "test", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]}]})
    [it] = eval.read("flickr30k", None, karpathy, "flickr")
    assert (it.id, it.image, it.references) == ("2.jpg", os.path.join("flickr", "2.jpg"), ["A dog."])

    rec = {"split": "val", "image_id": 299207, "question_id": "q1", "question": "What is it?",
           "choices": ["cat", "dog", "cow", "hen"], "correct_choice_idx": 1, "direct_answers": ["dog"] * 10,
           "difficult_direct_answer": False, "rationales": ["r"] * 3}
    aokvqa = write(tmp_path / "ao.json", [rec, {**rec, "question_id": "q2", "difficult_direct_answer": True}])
    items = eval.read("aokvqa", None, aokvqa, "coco")
    assert [(it.id, it.references[0], it.correct) for it in items] == \
        [("q1:mc", "dog", 1), ("q1:da", "dog", None), ("q2:mc", "dog", 1)]   # difficult: no direct-answer row
    assert items[0].image == os.path.join("coco", "val2017", "000000299207.jpg")
    # Scored as eval_predictions.py scores it: the difficult question counts in multiple choice only.
    assert eval.score("aokvqa", items, ["dog", "dog", "cat"]) == ([1.0, 1.0, 0.0], {"mc_accuracy": 50.0,
                                                                                   "da_accuracy": 100.0}, {})


@pytest.mark.parametrize("task, content, message", [
    ("vqav2:q", {"qs": []}, "{q}: missing field 'questions' (expected {{\"questions\": [...]}})"),
    ("vqav2:q", {"questions": [{"image_id": 10, "question_id": 100}]}, "{q} questions[0]: missing field 'question'"),
    ("vqav2:q", {"questions": [{"image_id": "x", "question": "?", "question_id": 100}]},
     "{q} questions[0]: field 'image_id': expected an integer, got str"),
    ("vqav2:q", {"questions": [{"image_id": 10, "question": "?", "question_id": 5}]},
     "{q} questions[0]: question_id 5 has no annotation in {a}"),
    ("vqav2:a", {"annotations": [{"question_id": 100, "answers": "red"}]},
     "{a} annotations[0]: field 'answers': expected a non-empty list"),
    ("vqav2:a", {"annotations": [{"question_id": 100, "answers": [{"answer": "red"}, {"ans": "x"}]}]},
     "{a} annotations[0] answers[1]: missing field 'answer'"),
    ("vqav2:a", "[1, 2", "{a} line 1 column 6: malformed JSON: Expecting ',' delimiter"),
    ("textvqa", {"data": [{"question_id": 1, "image_id": "x", "question": "?", "answers": [3, None]}]},
     "{f} data[0]: field 'answers[1]': expected text, got NoneType"),
    ("vizwiz", [["not", "a", "record"]], "{f} record[0]: expected a JSON object, got list"),
    ("coco", [{"image": "x.jpg", "caption": []}], "{f} record[0]: field 'caption': expected a non-empty list"),
    ("coco", {"images": [{"filename": "x.jpg", "split": "test", "sentences": [{"tokens": []}]}]},
     "{f} images[0] sentences[0]: missing field 'raw'"),
    ("coco", {"images": [{"filename": "x.jpg", "split": "val", "sentences": [{"raw": "a"}]}]},
     "{f}: no image has split 'test' (--split)"),
    ("aokvqa", [{"split": "val", "image_id": 1, "question_id": "q", "question": "?", "choices": ["a", "b"],
                 "correct_choice_idx": 2, "direct_answers": ["a"], "difficult_direct_answer": False}],
     "{f} record[0]: field 'correct_choice_idx': 2 is not an index into the 2 choices"),
    ("aokvqa", {"questions": []}, "{f}: the file: expected a list of records, got dict"),
])
def test_bad_input_names_file_record_and_field(tmp_path, task, content, message):
    q, a, images = vqa_files(tmp_path, n=1)
    task, _, which = task.partition(":")
    f = {"q": q, "a": a}.get(which, str(tmp_path / "f.json"))
    (tmp_path / os.path.basename(f)).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(data.DataError) as e:
        eval.read(task, q, a if task == "vqav2" else f, images)
    assert str(e.value) == message.format(q=q, a=a, f=f)


# ----------------------------------------------------------------------------------------------------------------
# Prompts

def test_prompts_zero_and_few_shot(tmp_path):
    q, a, images = vqa_files(tmp_path)
    items = eval.read("vqav2", q, a, images)
    text, pictures = eval.prompt_and_pictures(items[0], eval.pools([]), 0, "paper", eval.INSTRUCTIONS["vqa"], seed=0)
    assert text == (conversation.HEADER + "\n\n### Image:\n<image>\n\n### Instruction:\nWhat colour 0? Answer the question "
                    "using a single word or phrase.\n\n### Response:\n")
    assert pictures == [items[0].image]
    # One shot from a support set of the same file: never the item itself, the answer most humans gave.
    text, pictures = eval.prompt_and_pictures(items[0], eval.pools(items[:2]), 1, "flamingo", "", seed=0)
    assert text == ("<image>Question:What colour 1? Short answer:red<|endofchunk|>"
                    "<image>Question:What colour 0? Short answer:")
    assert pictures == [items[1].image, items[0].image]
    # Seeded by (seed, item id): the same examples whatever else is asked, others for another seed somewhere.
    support = eval.pools(items)
    draws = {s: [x.id for x in eval.draw_shots(items[0], support, 1, s)] for s in range(20)}
    assert draws[3] == [x.id for x in eval.draw_shots(items[0], support, 1, 3)]
    assert len({d[0] for d in draws.values()}) == 2 and all(d != ["100"] for d in draws.values())
    with pytest.raises(data.DataError, match="--shots 3 needs 3 besides the item itself"):
        eval.draw_shots(items[0], support, 3, 0)

    caption = eval.Item("1.jpg", "1.jpg", None, ["A dog.", "A pet."])
    assert eval.flamingo_block(caption, eval.shot_answer(caption)) == "<image>Output:A dog.<|endofchunk|>"
    mc = eval.Item("q:mc", "x.jpg", "What is it?", ["dog"], choices=["cat", "dog"], correct=1)
    assert eval.zero_shot_prompt(mc, eval.INSTRUCTIONS["aokvqa"]).endswith(
        "### Instruction:\nWhat is it?\n\n### Input:\ncat, dog\n\n### Response:\n")
    assert eval.flamingo_block(mc, None) == "<image>Question:What is it? Choices: cat, dog. Short answer:"


# ----------------------------------------------------------------------------------------------------------------
# Generation

def test_eval_generate_order_and_batches(tokenizer, tmp_path):
    """eval.generate puts the answers in the order of the prompts, whatever the engine's slots: 3 == 1."""
    model = tiny_model(tokenizer, seed=1)
    transform = checkpoints.image_transform_for(model.cfg.vision)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        picture(paths[-1], (50 * i, 200 - 30 * i, 90))
    prompts = [[1, tokenizer.image_id] + tokenizer.encode("what colour is the shape " * (i % 3 + 1), bos=False)
               for i in range(5)]
    run = lambda slots: eval.generate(Engine(model, tokenizer, slots), prompts, [[p] for p in paths], transform,
                                      max_new_tokens=6, workers=0)
    one = run(1)
    assert run(3) == one and len({tuple(x) for x in one}) > 1
    bad = str(tmp_path / "bad.png")
    open(bad, "w").write("not a picture")
    with pytest.raises(data.DataError, match=re.escape(f"unreadable picture {bad}")):
        eval.generate(Engine(model, tokenizer), prompts[:1], [[bad]], transform, max_new_tokens=2, workers=0)


# ----------------------------------------------------------------------------------------------------------------
# The program

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    paths = demo.make_base(str(tmp), seed=0)
    flags = ["--llama", paths["llama"], "--openflamingo", paths["openflamingo"], "--vision", paths["vision"],
             "--vision-weights", paths["vision_weights"], "--workers", "0"]
    return paths, flags


def test_demo_task_equals_train_evaluation(base, tmp_path, monkeypatch):
    paths, flags = base
    seen = []
    score = demo.score
    monkeypatch.setattr(demo, "score", lambda expected, answers: seen.append(list(answers)) or score(expected, answers))
    summary = eval.main(["--task", "demo", "--limit", "6", "--batch-size", "4", "--out", str(tmp_path), *flags])
    model, tokenizer, transform = checkpoints.load(paths["llama"], paths["openflamingo"], None, paths["vision"],
                                                   paths["vision_weights"])
    items = demo.eval_set(n=200, seed=1, pictures=demo.PICTURES)[:6]
    reported = train.evaluate(model, tokenizer, transform, [], items, 128, nullcontext(), "cpu")
    assert seen[0] == seen[1] and len(seen[0]) == 6
    assert summary["metrics"] == {k: v for k, v in reported.items() if k != "eval_loss"}
    lines = [json.loads(x) for x in open(tmp_path / "predictions.jsonl")]
    assert [x["output"] for x in lines] == seen[0]


def test_main_writes_predictions_and_summary(base, tmp_path, capsys):
    _, flags = base
    q, a, images = vqa_files(tmp_path)
    args = ["--task", "vqav2", "--questions", q, "--annotations", a, "--images", images, "--max-new-tokens", "4",
            *flags]
    summary = eval.main([*args, "--out", str(tmp_path / "one"), "--batch-size", "2"])
    assert "vqav2, 3 items, 0-shot (paper), answers openflamingo: accuracy" in capsys.readouterr().out
    lines = [json.loads(x) for x in open(tmp_path / "one" / "predictions.jsonl")]
    assert [x["id"] for x in lines] == ["100", "101", "102"]
    assert [x["score"] for x in lines] == [eval.vqa_accuracy(x["answer"], x["references"]) for x in lines]
    assert summary["metrics"]["accuracy"] == pytest.approx(100 * sum(x["score"] for x in lines) / 3)
    assert summary["answer_processor"] == "openflamingo"
    assert summary["per_answer_type"] == {"other": summary["metrics"]["accuracy"]}
    assert json.load(open(tmp_path / "one" / "summary.json")) == summary | {"seconds": summary["seconds"]}
    # Deterministic, whatever the batch size; --limit takes the first items; few-shot from a support file.
    eval.main([*args, "--out", str(tmp_path / "two"), "--batch-size", "3", "--limit", "2"])
    assert [json.loads(x) for x in open(tmp_path / "two" / "predictions.jsonl")] == lines[:2]
    shots = eval.main([*args, "--out", str(tmp_path / "shots"), "--shots", "1", "--support-questions", q,
                       "--support-annotations", a])
    first = json.loads(open(tmp_path / "shots" / "predictions.jsonl").readline())
    assert shots["format"] == "flamingo" and first["prompt"].count("<image>") == 2


def test_main_names_the_answer_processor(base, tmp_path, capsys, monkeypatch):
    """The same replies ("Yes." to everything) submitted by each processor: a different number, named in the printed
    line and summary.json."""
    _, flags = base
    q = write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": i, "question": "Is it?", "question_id": i} for i in range(2)]})
    a = write(tmp_path / "a.json", {"annotations": [vqa_annotation(0, 0, ["yes"] * 10, "yes/no", "is it"),
                                                    vqa_annotation(1, 1, ["yes"] * 9 + ["no"], "yes/no", "is it")]})
    for i in range(2):
        picture(str(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg"))
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids: "Yes.")
    args = ["--task", "vqav2", "--questions", q, "--annotations", a, "--images", str(tmp_path / "val2014"),
            "--max-new-tokens", "2", *flags]
    for processor, accuracy in (("openflamingo", 50.0), ("evalai", 100.0)):
        out = tmp_path / processor
        eval.main([*args, "--answer-processor", processor, "--out", str(out)])
        assert capsys.readouterr().out.startswith(
            f"vqav2, 2 items, 0-shot (paper), answers {processor}: accuracy {accuracy:.4g} (yes/no {accuracy:.4g})")
        saved = json.load(open(out / "summary.json"))
        assert (saved["answer_processor"], saved["metrics"], saved["per_question_type"]) == \
            (processor, {"accuracy": accuracy}, {"is it": accuracy})
    with pytest.raises(SystemExit):
        eval.parse_args(["--task", "coco", "--annotations", a, "--images", "x", "--answer-processor", "evalai"])
    assert eval.parse_args(["--task", "demo"]).answer_processor == "none"


def test_main_names_a_missing_picture_and_bad_flags(base, tmp_path):
    _, flags = base
    q, a, images = vqa_files(tmp_path)
    os.remove(os.path.join(images, "COCO_val2014_000000000011.jpg"))
    with pytest.raises(SystemExit) as e:
        eval.main(["--task", "vqav2", "--questions", q, "--annotations", a, "--images", images, *flags])
    assert e.value.code == (f"error: {q} questions[1]: picture not found: "
                            f"{os.path.join(images, 'COCO_val2014_000000000011.jpg')}")
    empty = write(tmp_path / "empty.json", [])
    with pytest.raises(SystemExit) as e:
        eval.main(["--task", "vizwiz", "--annotations", empty, "--images", images, *flags])
    assert e.value.code == f"error: {empty}: no items to score"
    with pytest.raises(SystemExit):
        eval.parse_args(["--task", "vqav2", "--annotations", a, "--images", images])    # no --questions
    with pytest.raises(SystemExit):
        eval.parse_args(["--task", "demo", "--shots", "2"])
