"""data.py: readers of every published format, the template and its labels, pictures, the loader."""
import json
import os
import random
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

import conversation
import data
from conversation import Conversation, DataError, Turn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
     "request.")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A stand-in for open_clip's transform: (3, 8, 8) floats."""
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def write_json(path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def write_picture(path, colour=(200, 30, 30), size=(16, 12)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return str(path)


def loss_runs(ids, labels) -> list[list[int]]:
    """Maximal runs of consecutive loss tokens."""
    runs, run = [], []
    for i, l in zip(ids, labels):
        if l != -100:
            assert l == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


# ----------------------------------------------------------------------------------------------------------------
# The template and the labels

def test_prompt_one_turn_with_image():
    conv = Conversation("a.jpg", [Turn("What is this?", "A cat.")])
    assert conversation.prompt(conv) == (H + "\n\n### Image:\n<image>\n\n### Instruction:\nWhat is this?"
                                 "\n\n### Response:\nA cat.</s>")


def test_prompt_several_turns():
    conv = Conversation("a.jpg", [Turn("Q1?", "A1."), Turn("Q2?", "A2."), Turn("Q3?", "A3.")])
    assert conversation.prompt(conv) == (H + "\n\n### Image:\n<image>"
                                 "\n\n### Instruction:\nQ1?\n\n### Response:\nA1.</s>"
                                 "\n\n### Instruction:\nQ2?\n\n### Response:\nA2.</s>"
                                 "\n\n### Instruction:\nQ3?\n\n### Response:\nA3.</s>")


def test_prompt_language_only_with_and_without_input():
    assert conversation.prompt(Conversation(None, [Turn("Say hi.", "Hi.")])) == (
        H + "\n\n### Instruction:\nSay hi.\n\n### Response:\nHi.</s>")
    assert conversation.prompt(Conversation(None, [Turn("Add them.", "7", "3 and 4")])) == (
        H + "\n\n### Instruction:\nAdd them.\n\n### Input:\n3 and 4\n\n### Response:\n7</s>")


def test_prompt_open_last_for_chat():
    conv = Conversation("a.jpg", [Turn("Q1?", "A1."), Turn("Q2?", "")])
    expected = H + "\n\n### Image:\n<image>\n\n### Instruction:\nQ1?\n\n### Response:\nA1.</s>" \
                   "\n\n### Instruction:\nQ2?\n\n### Response:\n"
    assert conversation.prompt(conv) == expected
    # open_last ignores a written last answer
    assert conversation.prompt(Conversation("a.jpg", [Turn("Q1?", "A1."), Turn("Q2?", "A2.")]), open_last=True) == expected


@pytest.mark.parametrize("conv", [
    Conversation("a.jpg", [Turn("What colour is the cat?", "The cat is red.")]),
    Conversation("a.jpg", [Turn("what is there?", "two cats"), Turn("where?", "on the mat"),
                           Turn("how many dogs?", "none, 0 dogs!")]),
    Conversation(None, [Turn("Write a word.", "square")]),
    Conversation(None, [Turn("Add the numbers.", "7", "3 and 4"), Turn("And now?", "8", "4 and 4")]),
    Conversation(None, [Turn("Spell it.", "éclair ü 日本")]),      # byte-fallback tokens at the answer's start
])
def test_render_ids_and_label_spans(tokenizer, conv):
    ids, labels = data.render(conv, tokenizer)
    assert ids == tokenizer.encode(conversation.prompt(conv))
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id
    assert ids.count(tokenizer.image_id) == (conv.image is not None)
    assert len(labels) == len(ids)
    runs = loss_runs(ids, labels)
    # one run per answer, each exactly the answer and its </s>; everything else is -100
    assert [tokenizer.decode(r) for r in runs] == [t.answer + "</s>" for t in conv.turns]
    assert sum(l != -100 for l in labels) == sum(map(len, runs))
    assert labels.count(tokenizer.eos_id) == len(conv.turns) and ids.count(tokenizer.eos_id) == len(conv.turns)


def test_render_truncation_keeps_the_first_tokens_or_drops(tokenizer):
    conv = Conversation(None, [Turn("what is there?", "two cats"), Turn("where?", "on the mat")])
    ids, labels = data.render(conv, tokenizer, max_len=None)
    first_loss = next(i for i, l in enumerate(labels) if l != -100)
    cut = data.render(conv, tokenizer, max_len=first_loss + 2)
    assert cut == (ids[:first_loss + 2], labels[:first_loss + 2])
    assert data.render(conv, tokenizer, max_len=first_loss) is None   # nothing left to learn from: dropped


def test_sample_length_agrees_with_render(tokenizer):
    rng = random.Random(0)
    words = "the cat sat on mat red é 3 ### square".split()

    def text(n):
        return " ".join(rng.choices(words, k=rng.randint(1, n)))
    convs = [Conversation(rng.choice([None, "a.jpg"]), [Turn(text(40), text(20), rng.choice(["", text(10)]))
                                                        for _ in range(rng.randint(1, 3))]) for _ in range(150)]
    for max_len in (24, 40, 60, 90):
        for conv in convs:
            rendered = data.render(conv, tokenizer, max_len)
            assert data.sample_length(conv, tokenizer, max_len) == (None if rendered is None else len(rendered[0]))


def test_dataset_drops_and_counts_samples_without_loss_tokens(tokenizer):
    short = Conversation(None, [Turn("hi", "yes")])
    long = Conversation(None, [Turn("the cat sat on the mat " * 30, "yes")])
    ds = data.InstructionDataset([short, long, short], tokenizer, max_len=60)
    assert len(data.render(long, tokenizer, None)[0]) > 60 and len(data.render(short, tokenizer, None)[0]) < 60
    assert (len(ds), ds.dropped) == (2, 1)
    assert ds.lengths == [len(data.render(short, tokenizer)[0])] * 2


# ----------------------------------------------------------------------------------------------------------------
# Readers: each published format

def test_llava_single_turn(tmp_path):
    root = tmp_path / "coco"
    for name in ("000000033471.jpg", "000000052846.jpg"):
        write_picture(root / name)
    ann = write_json(tmp_path / "detail_23k.json", [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned in the image?\n<image>"},
            {"from": "gpt", "value": "The cat is on top of the back of the couch."}]},
    ])
    convs = data.read("llava", [ann], str(root))
    assert convs == [
        Conversation(os.path.join(str(root), "000000033471.jpg"),
                     [Turn("What are the colors of the bus in the image?", "The bus in the image is white and red.")]),
        Conversation(os.path.join(str(root), "000000052846.jpg"),
                     [Turn("Where is the cat positioned in the image?", "The cat is on top of the back of the couch.")]),
    ]
    assert convs[0].source == f"llava:{ann}"


def test_llava_dialogue_every_turn_in_order(tmp_path):
    write_picture(tmp_path / "coco" / "1.jpg")
    msgs = [{"from": "human", "value": "Q0?\n<image>"}, {"from": "gpt", "value": "A0"},
            {"from": "human", "value": "Q1?"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2"}]
    ann = write_json(tmp_path / "conversation_58k.json", [{"id": "1", "image": "1.jpg", "conversations": msgs}])
    (conv,) = data.read("llava_dial", ann, tmp_path / "coco")
    assert conv.turns == [Turn("Q0?", "A0"), Turn("Q1?", "A1"), Turn("Q2?", "A2")]   # answer i = message 2i+1


def test_image_marker_removed_wherever_it_stands(tmp_path):
    write_picture(tmp_path / "1.jpg")
    values = ["<image>\nWhat?", "What?\n<image>", "What is <image> this?", "<image> What?"]
    ann = write_json(tmp_path / "a.json", [{"image": "1.jpg", "conversations": [
        {"from": "human", "value": v}, {"from": "gpt", "value": "ok"}]} for v in values])
    assert [c.turns[0].question for c in data.read("llava", ann, tmp_path)] == ["What?", "What?", "What is this?",
                                                                                 "What?"]


def test_minigpt4_cc_sbu_align(tmp_path):
    write_picture(tmp_path / "image" / "2.jpg")
    write_picture(tmp_path / "image" / "15.jpg")
    ann = write_json(tmp_path / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": "The image shows a man fishing on a lawn."},
        {"image_id": "15", "caption": "A red car parked by a tree."}]})
    convs = data.read("minigpt4", [ann], str(tmp_path / "image"))
    assert [c.image for c in convs] == [os.path.join(str(tmp_path / "image"), f) for f in ("2.jpg", "15.jpg")]
    assert [c.turns[0].answer for c in convs] == ["The image shows a man fishing on a lawn.",
                                                  "A red car parked by a tree."]
    assert all(len(c.turns) == 1 and c.turns[0].question in data.CAPTION_QUESTIONS for c in convs)


def aokvqa_record(**over):
    rec = {"split": "train", "image_id": 299207, "question_id": "22MexNkBPpdZGX6sxbxVBH",
           "question": "What is the man by the bags awaiting?", "choices": ["skateboarder", "train", "delivery", "cab"],
           "correct_choice_idx": 3, "direct_answers": ["ride"] * 10, "difficult_direct_answer": False,
           "rationales": ["A train would not be on the street.", "He has bags as if he is going someone.",
                          "He is waiting for a cab."]}
    return dict(rec, **over)


def test_aokvqa(tmp_path):
    write_picture(tmp_path / "coco" / "train2017" / "000000299207.jpg")
    write_picture(tmp_path / "coco" / "val2017" / "000000000042.jpg")
    ann = write_json(tmp_path / "aokvqa_v1p0_train.json",
                     [aokvqa_record(), aokvqa_record(split="val", image_id=42)])
    for prob, shown in ((1.0, "skateboarder, train, delivery, cab"), (0.0, "")):
        convs = data.read("aokvqa", ann, tmp_path / "coco", option_prob=prob)
        assert [c.image for c in convs] == [os.path.join(str(tmp_path / "coco"), "train2017", "000000299207.jpg"),
                                            os.path.join(str(tmp_path / "coco"), "val2017", "000000000042.jpg")]
        turn = convs[0].turns[0]
        assert turn.answer == ("The answer is cab. Because A train would not be on the street. He has bags as if he "
                               "is going someone. He is waiting for a cab.")
        q, follow_up = turn.question.split("? ", 1)
        assert q == "What is the man by the bags awaiting" and follow_up in data.WHY_QUESTIONS
        assert turn.input == shown


def test_aokvqa_choices_shown_about_half_the_time_by_default(tmp_path):
    write_picture(tmp_path / "train2017" / "000000299207.jpg")
    ann = write_json(tmp_path / "a.json", [aokvqa_record()] * 200)
    shown = sum(bool(c.turns[0].input) for c in data.read("aokvqa", ann, tmp_path))
    assert 70 < shown < 130
    assert len({c.turns[0].question for c in data.read("aokvqa", ann, tmp_path)}) > 3   # the follow-ups vary


def test_coco_caption(tmp_path):
    write_picture(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    write_picture(tmp_path / "coco" / "train2014" / "COCO_train2014_000000057870.jpg")
    caps = ["A man with a red helmet on a small moped on a dirt road.", "Man riding a motor bike on a dirt road.",
            "A man in a red shirt and a red hat is on a motorcycle."]
    ann = write_json(tmp_path / "coco_karpathy_val.json", [
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": caps, "image_id": "391895"},
        {"image": "train2014/COCO_train2014_000000057870.jpg", "caption": "A restaurant with chairs.",
         "image_id": "coco_57870"}])
    root = str(tmp_path / "coco")
    convs = data.read("coco_caption", ann, root)
    assert [c.image for c in convs] == [os.path.join(root, "val2014/COCO_val2014_000000391895.jpg"),
                                        os.path.join(root, "train2014/COCO_train2014_000000057870.jpg")]
    assert convs[0].turns[0].answer in caps and convs[1].turns[0].answer == "A restaurant with chairs."
    assert all(c.turns[0].question in data.CAPTION_QUESTIONS for c in convs)
    every = data.read("coco_caption", ann, root, all_captions=True)
    assert [c.turns[0].answer for c in every] == caps + ["A restaurant with chairs."]


def test_ocr_vqa(tmp_path):
    write_picture(tmp_path / "images" / "1930108042.jpg")
    write_picture(tmp_path / "images" / "0394800168.png")
    ann = write_json(tmp_path / "dataset.json", {
        "1930108042": {"imageURL": "http://ecx.images-amazon.com/images/I/51E8n7U8eZL.jpg",
                       "questions": ["Who wrote this book?", "What is the title of this book?", "Is this a comedy?"],
                       "answers": ["Sandra Boynton", "Moo, Baa, La La La!", "No"], "title": "Moo, Baa, La La La!",
                       "genre": "Children's Books", "split": 1},
        "0394800168": {"imageURL": "http://ecx.images-amazon.com/images/I/x.png", "questions": ["Who wrote it?"],
                       "answers": ["Dr. Seuss"], "title": "t", "genre": "g", "split": 2}})
    root = str(tmp_path / "images")
    convs = data.read("ocr_vqa", ann, root)
    assert convs == [
        Conversation(os.path.join(root, "1930108042.jpg"), [
            Turn("Who wrote this book?", "Sandra Boynton"), Turn("What is the title of this book?", "Moo, Baa, La La La!"),
            Turn("Is this a comedy?", "No")]),
        Conversation(os.path.join(root, "0394800168.png"), [Turn("Who wrote it?", "Dr. Seuss")])]
    pairs = data.read("ocr_vqa", ann, root, ocr_turns=False)
    assert [len(c.turns) for c in pairs] == [1, 1, 1, 1]
    assert [c.turns[0].answer for c in pairs] == ["Sandra Boynton", "Moo, Baa, La La La!", "No", "Dr. Seuss"]


def test_dolly_jsonl(tmp_path):
    path = tmp_path / "databricks-dolly-15k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "When did Virgin Australia start operating?", "context": "Virgin Australia commenced "
         "services on 31 August 2000.", "response": "On 31 August 2000.", "category": "closed_qa"},
        {"instruction": "Which is a species of fish? Tope or Rope", "context": "", "response": "Tope",
         "category": "classification"}]) + "\n")
    assert data.read("dolly", str(path)) == [
        Conversation(None, [Turn("When did Virgin Australia start operating?", "On 31 August 2000.",
                                 "Virgin Australia commenced services on 31 August 2000.")]),
        Conversation(None, [Turn("Which is a species of fish? Tope or Rope", "Tope")])]


def test_alpaca_gpt4(tmp_path):
    ann = write_json(tmp_path / "alpaca_gpt4_data.json", [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep."},
        {"instruction": "Identify the odd one out.", "input": "Twitter, Instagram, Telegram",
         "output": "Telegram."}])
    convs = data.read("alpaca_gpt4", [ann])
    assert convs == [Conversation(None, [Turn("Give three tips for staying healthy.", "1. Eat well.\n2. Sleep.")]),
                     Conversation(None, [Turn("Identify the odd one out.", "Telegram.",
                                              "Twitter, Instagram, Telegram")])]


def test_baize_turns_and_trailing_empty_turn_ignored(tmp_path):
    ann = write_json(tmp_path / "quora_chat_data.json", [
        {"topic": "How do I learn Python?",
         "input": "The conversation between human and AI assistant.\n[|Human|] How do I learn Python?\n[|AI|] "
                  "Start with the tutorial.\nThen write code.\n[|Human|] Which tutorial?\n[|AI|] The official one."
                  "\n[|Human|] "}])
    (conv,) = data.read("baize", ann)
    assert conv == Conversation(None, [Turn("How do I learn Python?", "Start with the tutorial.\nThen write code."),
                                       Turn("Which tutorial?", "The official one.")])


def test_reads_are_deterministic_in_seed(tmp_path):
    write_picture(tmp_path / "image" / "2.jpg")
    ann = write_json(tmp_path / "filter_cap.json", {"annotations": [{"image_id": "2", "caption": "c"}] * 50})
    questions = [[c.turns[0].question for c in data.read("minigpt4", ann, tmp_path / "image", seed=s)]
                 for s in (0, 0, 1)]
    assert questions[0] == questions[1] != questions[2]


# ----------------------------------------------------------------------------------------------------------------
# Bad input

def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "detail_23k.json"
    path.write_text('[\n{"image": "a.jpg",\n "conversations": [}\n]')
    with pytest.raises(DataError, match=r"detail_23k\.json line 3 .*malformed JSON"):
        data.read("llava", str(path), tmp_path)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps({"instruction": "a", "context": "", "response": "b"}) + "\n{not json}\n")
    with pytest.raises(DataError, match=r"dolly\.jsonl line 2 .*malformed JSON line"):
        data.read("dolly", str(path))
    errors = []
    assert len(data.read("dolly", str(path), errors=errors)) == 1 and "line 2" in str(errors[0])


@pytest.mark.parametrize("kind,record,field,pattern", [
    ("llava", {"image": "a.jpg"}, None, r"record 1: missing field 'conversations'"),
    ("llava", {"image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, None,
     r"record 1: missing field 'conversations\[1\]\.value'"),
    ("llava", {"image": "a.jpg", "conversations": [{"from": "gpt", "value": "q"}, {"from": "gpt", "value": "a"}]},
     None, r"record 1: field 'conversations\[0\]\.from'"),
    ("aokvqa", None, "rationales", r"record 1: missing field 'rationales'"),
    ("aokvqa", None, "correct_choice_idx", r"record 1: missing field 'correct_choice_idx'"),
    ("alpaca_gpt4", {"instruction": "a", "input": ""}, None, r"record 1: missing field 'output'"),
    ("alpaca_gpt4", {"instruction": ["a"], "input": "", "output": "b"}, None, r"record 1: field 'instruction'"),
    ("baize", {"topic": "t", "input": "[|Human|] hi\n[|Human|] "}, None, r"record 1: field 'input'"),
    ("coco_caption", {"image": "a.jpg"}, None, r"record 1: missing field 'caption'"),
])
def test_missing_or_bad_field_names_file_record_and_field(tmp_path, kind, record, field, pattern):
    write_picture(tmp_path / "a.jpg")
    write_picture(tmp_path / "train2017" / "000000299207.jpg")
    good = {"llava": {"image": "a.jpg", "conversations": [{"from": "human", "value": "q"},
                                                         {"from": "gpt", "value": "a"}]},
            "aokvqa": aokvqa_record(), "alpaca_gpt4": {"instruction": "a", "input": "", "output": "b"},
            "baize": {"topic": "t", "input": "[|Human|] hi\n[|AI|] hello\n[|Human|] "},
            "coco_caption": {"image": "a.jpg", "caption": "c"}}[kind]
    if record is None:
        record = {k: v for k, v in good.items() if k != field}
    ann = write_json(tmp_path / "ann.json", [good, record])
    with pytest.raises(DataError, match=r"ann\.json " + pattern):
        data.read(kind, ann, tmp_path)
    errors = []
    assert len(data.read(kind, ann, tmp_path, errors=errors)) == 1 and len(errors) == 1


def test_field_helpers_that_eval_reads_with():
    rec, where = {"id": 7, "q": "  a question ", "refs": ["x", 2], "one": "y", "blank": " "}, "f.json record 3"
    assert data.text_field(rec, "id", where) == "7"
    assert data.text_field(rec, "q", where) == "a question"
    assert data.texts_field(rec, "refs", where) == ["x", "2"]
    assert data.texts_field(rec, "one", where, single_ok=True) == ["y"]
    assert data.text_field(rec, "blank", where, empty_ok=True) == ""
    for call, message in [(lambda: data.get_field([], "q", where), "f.json record 3: expected a JSON object, got list"),
                          (lambda: data.text_field(rec, "x", where), "f.json record 3: missing field 'x'"),
                          (lambda: data.text_field(rec, "blank", where), "f.json record 3: field 'blank' is empty"),
                          (lambda: data.texts_field(rec, "one", where), "field 'one': expected a non-empty list"),
                          (lambda: data.as_text(None, "a[0]", where), "field 'a[0]': expected text, got NoneType"),
                          (lambda: data.as_text("\ud800", "q", where), "a lone surrogate")]:
        with pytest.raises(DataError) as e:
            call()
        assert message in str(e.value)


def test_ocr_and_minigpt4_errors_name_the_record(tmp_path):
    ann = write_json(tmp_path / "dataset.json", {"123": {"imageURL": "http://x/y.jpg", "questions": ["q1", "q2"],
                                                         "answers": ["a1"]}})
    with pytest.raises(DataError, match=r"dataset\.json record '123': field 'answers'"):
        data.read("ocr_vqa", ann, tmp_path)
    ann = write_json(tmp_path / "filter_cap.json", {"annotations": [{"caption": "c"}]})
    with pytest.raises(DataError, match=r"filter_cap\.json annotations\[0\]: missing field 'image_id'"):
        data.read("minigpt4", ann, tmp_path)
    ann = write_json(tmp_path / "bad.json", [{"image_id": "1", "caption": "c"}])
    with pytest.raises(DataError, match=r"bad\.json: missing field 'annotations'"):
        data.read("minigpt4", ann, tmp_path)


def test_missing_picture_names_path_and_source(tmp_path):
    write_picture(tmp_path / "there.jpg")
    recs = [{"image": name, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for name in ("there.jpg", "gone.jpg")]
    ann = write_json(tmp_path / "detail_23k.json", recs)
    with pytest.raises(DataError) as e:
        data.read("llava", ann, tmp_path)
    assert str(tmp_path / "gone.jpg") in str(e.value) and "llava" in str(e.value) and "record 1" in str(e.value)
    errors = []
    assert [c.image for c in data.read("llava", ann, tmp_path, errors=errors)] == [str(tmp_path / "there.jpg")]
    assert len(errors) == 1
    assert len(data.read("llava", ann, tmp_path, check_images=False)) == 2


def test_missing_annotation_file_and_unknown_kind(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.json: annotation file not found"):
        data.read("dolly", str(tmp_path / "nothere.json"))
    with pytest.raises(DataError, match="unknown kind 'vqav2'"):
        data.read("vqav2", [])
    with pytest.raises(DataError, match="unknown option"):
        data.read("dolly", [], option_prob=0.5)


def test_unreadable_picture_at_load_time(tmp_path, tokenizer):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = write_picture(tmp_path / "good.jpg")
    convs = [Conversation(str(bad), [Turn("q", "a")], source="llava:ann.json"), Conversation(good, [Turn("q", "a")])]
    ds = data.InstructionDataset(convs, tokenizer, to_tensor)
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(bad) in str(e.value) and "llava:ann.json" in str(e.value)
    skipping = data.InstructionDataset(convs, tokenizer, to_tensor, skip_bad=True)
    assert skipping[0] is None and skipping[1]["image"].shape == (3, 8, 8)
    stream = data.Stream(skipping, batch_size=2)
    batch = next(iter(stream))
    assert batch["input_ids"].shape[0] == 1 and stream.skipped == 1 and stream.position == 2


# ----------------------------------------------------------------------------------------------------------------
# Pictures

@pytest.mark.parametrize("make,expected", [
    (lambda: Image.new("RGB", (4, 4), (10, 20, 30)), (10, 20, 30)),
    (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
    (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
    (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),      # transparent: white
    (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
    (lambda: Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),               # half black on white
    (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),   # 16-bit
    (lambda: Image.fromarray(np.full((4, 4), 32896, np.int32)), (128, 128, 128)),    # "I" with 16-bit values
])
def test_load_image_any_mode_to_rgb(tmp_path, make, expected):
    im = make()
    path = tmp_path / ("p.tiff" if im.mode in ("CMYK", "I;16", "I") else "p.png")
    im.save(path)
    out = conversation.load_image(str(path))
    assert out.mode == "RGB" and out.size == (4, 4)
    assert all(abs(a - b) <= 1 for a, b in zip(out.getpixel((1, 1)), expected))


def test_load_image_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    out = conversation.load_image(str(tmp_path / "p.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((2, 2)) == (255, 255, 255)


def test_load_image_applies_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))              # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                    # Orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = conversation.load_image(str(tmp_path / "r.jpg"))
    assert out.size == (20, 40)                         # turned upright
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60   # red went to the top


# ----------------------------------------------------------------------------------------------------------------
# Config and mix

def test_configs_reproduce_the_paper_mix():
    with open(os.path.join(ROOT, "configs", "mmgpt.json")) as f:
        cfg = json.load(f)
    vl = {s["kind"]: s for s in cfg["vl"]}
    assert set(vl) == {"llava", "llava_dial", "minigpt4", "aokvqa", "coco_caption", "ocr_vqa"}
    assert {k: s.get("sample") for k, s in vl.items()} == {"llava": None, "llava_dial": None, "minigpt4": None,
                                                          "aokvqa": 5000, "coco_caption": 512, "ocr_vqa": 512}
    assert sorted(os.path.basename(p) for p in vl["llava"]["ann"] + vl["llava_dial"]["ann"]) == [
        "complex_reasoning_77k.json", "conversation_58k.json", "detail_23k.json"]
    assert [s["kind"] for s in cfg["lang"]] == ["dolly", "alpaca_gpt4"]
    paths = [p for s in cfg["vl"] + cfg["lang"] for p in s["ann"] + [s.get("image_root") or "data/"]]
    assert all(p.startswith("data/") for p in paths)
    with pytest.raises(DataError, match=r"data/llava/detail_23k\.json: annotation file not found"):
        data.load_mix(os.path.join(ROOT, "configs", "mmgpt.json"))   # read as far as the first missing file
    mix = data.load_mix(os.path.join(ROOT, "configs", "demo.json"))
    assert mix.counts == {"demo": 4000, "demo_lang": 2000} and len(mix.vl) == 4000 and len(mix.lang) == 2000


def test_load_mix_sample_weight_and_errors(tmp_path):
    write_picture(tmp_path / "img" / "1.jpg")
    recs = [{"image": "1.jpg", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
            for i in range(10)]
    llava = write_json(tmp_path / "llava.json", recs + [{"image": "missing.jpg", "conversations": recs[0][
        "conversations"]}])
    alpaca = write_json(tmp_path / "alpaca.json", [{"instruction": f"i{i}", "input": "", "output": "o"}
                                                   for i in range(4)])
    cfg = write_json(tmp_path / "mix.json", {"seed": 3, "vl": [
        {"kind": "llava", "ann": [llava], "image_root": str(tmp_path / "img"), "sample": 4, "weight": 1.5}],
        "lang": [{"kind": "alpaca_gpt4", "ann": [alpaca], "weight": 2, "name": "alpaca"}]})
    with pytest.raises(DataError, match="missing.jpg"):
        data.load_mix(cfg)
    mix = data.load_mix(cfg, skip_bad=True)
    assert len(mix.errors) == 1 and "missing.jpg" in str(mix.errors[0])
    assert mix.counts == {"llava": 6, "alpaca": 8}
    assert len({c.turns[0].question for c in mix.vl}) == 4            # 4 drawn, half of them twice
    assert sorted(c.turns[0].question for c in mix.lang) == sorted(["i0", "i1", "i2", "i3"] * 2)
    assert [c.turns for c in data.load_mix(cfg, skip_bad=True).vl] == [c.turns for c in mix.vl]   # seeded


def test_load_mix_rejects_bad_configs(tmp_path):
    cases = [({"vl": [{"kind": "dolly", "ann": []}]}, r"vl\[0\]: field 'kind': dolly belongs in \"lang\""),
             ({"vl": [{"kind": "llava", "ann": [], "images": "x"}]}, r"vl\[0\]: unknown field\(s\) images"),
             ({"lang": [{"ann": []}]}, r"lang\[0\]: missing field 'kind'"),
             ({"vl": [], "epochs": 2}, r"expected an object with keys")]
    for cfg, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            data.load_mix(write_json(tmp_path / "c.json", cfg))
    (tmp_path / "broken.json").write_text('{"vl": [\n')
    with pytest.raises(DataError, match=r"broken\.json line 2"):
        data.load_mix(str(tmp_path / "broken.json"))


# ----------------------------------------------------------------------------------------------------------------
# Batches: collate, rank sharding, resume, cycling, grouping, workers

def lang_dataset(tokenizer, n: int) -> data.InstructionDataset:
    # answers of different lengths, so that length grouping has something to do
    return data.InstructionDataset([Conversation(None, [Turn(f"what is {i}?", "cat " * (1 + (i * 7) % 5) + str(i))])
                                    for i in range(n)], tokenizer)


def answers(batch, tokenizer) -> list[str]:
    return [tokenizer.decode([i for i in row.tolist() if i != -100]) for row in batch["labels"]]


def test_collate_pads_on_the_right(tokenizer, tmp_path):
    pic = write_picture(tmp_path / "a.jpg")
    convs = [Conversation(pic, [Turn("q", "a")]), Conversation(pic, [Turn("a longer question", "a longer answer")])]
    ds = data.InstructionDataset(convs, tokenizer, to_tensor)
    batch = data.collate([ds[0], ds[1]], pad_id=tokenizer.pad_id)
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n1) and n0 < n1
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"][0, :n0].tolist() == ds[0]["input_ids"].tolist()
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_id).all() and (batch["labels"][0, n0:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0) and batch["attention_mask"][1].all()
    assert batch["images"].shape == (2, 1, 3, 8, 8) and torch.equal(batch["images"][1, 0], to_tensor(
        conversation.load_image(pic)))
    assert batch["skipped"] == 0
    lang = data.collate([lang_dataset(tokenizer, 2)[0]], pad_id=tokenizer.pad_id)
    assert lang["images"] is None


@pytest.mark.parametrize("batch_size,group_window", [(1, 0), (2, 0), (1, 8), (3, 16)])
def test_ranks_cover_exactly_what_one_rank_covers(tokenizer, batch_size, group_window):
    ds = lang_dataset(tokenizer, 23)   # not a multiple of anything: steps run across epochs

    def steps(world_size, n_steps):
        streams = [data.Stream(ds, batch_size=batch_size, seed=5, rank=r, world_size=world_size,
                               group_window=group_window) for r in range(world_size)]
        per_rank = [[answers(b, tokenizer) for b in islice(s, n_steps)] for s in streams]
        return per_rank, streams

    (one,), _ = steps(1, 40)
    (r0, r1), streams = steps(2, 20)
    for k in range(20):   # 2 ranks x accumulation k == 1 rank x accumulation 2k
        assert sorted(r0[k] + r1[k]) == sorted(one[2 * k] + one[2 * k + 1])
    if batch_size == 1:
        assert [a for k in range(20) for a in r0[k] + r1[k]] == [a for b in one for a in b]   # p % W == r, in order
    assert all(s.position == 20 * 2 * batch_size for s in streams)


def test_epochs_are_fresh_permutations(tokenizer):
    ds = lang_dataset(tokenizer, 6)
    seen = [answers(b, tokenizer)[0] for b in islice(data.Stream(ds, seed=1), 18)]
    epochs = [seen[i:i + 6] for i in (0, 6, 12)]
    everything = sorted(answers(data.collate([ds[i] for i in range(6)], tokenizer.pad_id), tokenizer))
    assert all(sorted(e) == everything for e in epochs) and len({tuple(e) for e in epochs}) > 1
    other = [answers(b, tokenizer)[0] for b in islice(data.Stream(ds, seed=2), 6)]
    assert other != epochs[0]


def test_resume_from_a_sample_position(tokenizer):
    ds = lang_dataset(tokenizer, 13)
    a = data.Stream(ds, batch_size=2, seed=7, world_size=2, rank=1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    assert state["position"] == 5 * 2 * 2
    rest = [answers(next(it), tokenizer) for _ in range(6)]
    b = data.Stream(ds, batch_size=2, seed=7, world_size=2, rank=1)
    b.load_state_dict(json.loads(json.dumps(state)))    # survives a checkpoint as plain JSON
    assert [answers(x, tokenizer) for x in islice(b, 6)] == rest
    with pytest.raises(ValueError, match="seed"):
        data.Stream(ds, batch_size=2, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="size"):
        data.Stream(lang_dataset(tokenizer, 12), seed=7).load_state_dict(state)


def test_length_grouping_cuts_padding(tokenizer):
    ds = data.InstructionDataset([Conversation(None, [Turn("q", "cat " * random.Random(i).randint(1, 40))])
                                  for i in range(64)], tokenizer)

    def padding(window):
        batches = list(islice(data.Stream(ds, batch_size=4, seed=0, group_window=window), 16))
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(32) < padding(0) / 3
    order = data.Stream(ds, seed=0, group_window=32).order(0)
    assert sorted(order.tolist()) == list(range(64))
    for w in (0, 32):
        window = [ds.lengths[i] for i in order[w:w + 32]]
        assert window == sorted(window)


def test_language_stream_cycles_independently(tokenizer, tmp_path):
    pic = write_picture(tmp_path / "a.jpg")
    mix = data.Mix([Conversation(pic, [Turn(f"q{i}", f"v{i}")]) for i in range(10)],
                   [Conversation(None, [Turn(f"q{i}", f"l{i}")]) for i in range(3)], {}, [])
    vl, lang = data.train_streams(mix, tokenizer, to_tensor, seed=0)
    pairs = [(answers(v, tokenizer)[0], answers(l, tokenizer)[0]) for v, l in islice(zip(vl, lang), 10)]
    assert sorted(v for v, _ in pairs) == sorted(f"v{i}</s>" for i in range(10))       # one vision epoch
    for k in range(3):                                                                 # three language cycles
        assert sorted(l for _, l in pairs[3 * k:3 * k + 3]) == [f"l{i}</s>" for i in range(3)]
    assert vl.state_dict()["position"] == 10 and lang.state_dict()["position"] == 10
    assert vl.steps_per_epoch == 10


def test_workers_decode_pictures(tokenizer, tmp_path):
    import demo
    vl, _ = demo.train_set(8, 0, pictures=str(tmp_path))
    ds = data.InstructionDataset(vl, tokenizer, to_tensor)
    in_process = list(islice(data.Stream(ds, batch_size=2, seed=3), 4))
    with_workers = list(islice(data.Stream(ds, batch_size=2, seed=3, num_workers=2), 4))
    for a, b in zip(in_process, with_workers):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["images"], b["images"])
    assert in_process[0]["images"].shape == (2, 1, 3, 8, 8) and in_process[0]["images"].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_show_and_check(tmp_path, sp_model, capsys):
    write_picture(tmp_path / "img" / "1.jpg")
    (tmp_path / "img" / "2.jpg").write_bytes(b"broken")
    recs = [{"image": f"{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                    {"from": "gpt", "value": "A red cat."}]} for i in (1, 2, 3)]
    ann = write_json(tmp_path / "llava.json", recs)
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Say hi.", "context": "", "response": "Hi."}) + "\n")
    cfg = write_json(tmp_path / "c.json", {"vl": [{"kind": "llava", "ann": [ann], "image_root": str(tmp_path / "img")}],
                                           "lang": [{"kind": "dolly", "ann": [str(dolly)]}]})
    assert data.main([cfg, "--show", "2", "--tokenizer", sp_model]) == 1           # 3.jpg is missing
    assert "3.jpg" in capsys.readouterr().err
    assert data.main([cfg, "--show", "2", "--tokenizer", sp_model, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "«A red cat.</s>»" in out and "«Hi.</s>»" in out and "What is it?" in out
    assert "llava" in out and "dolly" in out and "skipped: 1" in out
    assert data.main([cfg, "--check", "--tokenizer", sp_model]) == 1
    out = capsys.readouterr().out
    assert "3.jpg" in out and "2.jpg" in out and "unreadable pictures: 1" in out


def test_cli_on_the_demo_config(capsys):
    assert data.main([os.path.join(ROOT, "configs", "demo.json"), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("==== sample") == 2 and "### Image:" in out and "</s>»" in out
    assert "demo             4000" in out and "demo_lang        2000" in out
