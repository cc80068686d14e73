"""demo.py: the built-in demo set (pictures, questions, held-out split, scoring, tokenizer corpus)."""
import json

import numpy as np

import conversation
import data
import demo
from tokenizer import Tokenizer


def test_demo_set_is_deterministic():
    a, b, c = demo.train_set(300, 100, seed=0), demo.train_set(300, 100, seed=0), demo.train_set(
        300, 100, seed=1)
    assert a == b and a != c
    assert np.array_equal(np.asarray(demo.draw(a[0][5].image)), np.asarray(demo.draw(b[0][5].image)))
    assert demo.eval_set(50) == demo.eval_set(50)


def test_demo_answers_follow_the_pictures():
    vl, lang = demo.train_set(400, 200)
    asked = set()
    for conv in vl:
        scene = json.loads(conv.image[len("demo:"):])
        pixels = np.asarray(demo.draw(conv.image)).astype(int)
        assert pixels.shape == (demo.SIZE, demo.SIZE, 3)
        for shape, colour, cx, cy, r in scene["shapes"]:
            assert (pixels[cy + r // 2, cx] == demo.COLOURS[colour]).all()   # drawn where the scene says
        assert 1 <= len(conv.turns) <= 4
        words = {w.strip("?").lower() for t in conv.turns for w in t.question.split()}
        assert not words & {t.answer for t in conv.turns}    # no question gives away an answer
        n = len(scene["shapes"])
        for t in conv.turns:
            if t.question.startswith("How many"):
                kind = "count"
                assert t.answer == str(n)
            elif "colo" in t.question:
                kind = "colour"
                assert {s[1] for s in scene["shapes"]} == {t.answer}
            elif "shape" in t.question and t.question.startswith(("What shape", "Which shape")):
                kind = "shape"
                assert {s[0] for s in scene["shapes"]} == {t.answer}
            else:
                kind = "position"
                (x0, y0), (x1, y1) = demo.SIDES[t.answer]    # every shape on that side's line, in order along it
                along = [cy if x0 == x1 else cx for _, _, cx, cy, _ in scene["shapes"]]
                for _, _, cx, cy, _ in scene["shapes"]:
                    assert abs((cx - x0 * demo.SIZE) if x0 == x1 else (cy - y0 * demo.SIZE)) <= 2
                assert along == [round((i + 0.5) / n * demo.SIZE) for i in range(n)]
            asked.add((kind, n))
    # every question kind is asked of one shape and of several
    assert asked == {(k, n) for k in demo.ANSWERS for n in range(1, len(demo.COUNTS) + 1)}
    assert any(len(c.turns) > 1 for c in vl) and all(c.image is None for c in lang)
    assert any(t.input for c in lang for t in c.turns)
    # every answer of each type occurs
    answers = {t.answer for c in vl for t in c.turns}
    assert answers == {a for v in demo.ANSWERS.values() for a in v}


def test_demo_shapes_never_touch():
    """Shapes stand apart (three along a side included), so the coloured area and the blobs tell their number."""
    vl, _ = demo.train_set(400, 0)
    for conv in vl:
        boxes = [(cx - r, cy - r, cx + r, cy + r) for _, _, cx, cy, r in json.loads(conv.image[5:])["shapes"]]
        for a, b in zip(boxes, boxes[1:]):
            assert a[2] < b[0] or a[3] < b[1]       # the next one starts after this one ends (right or below)


def test_demo_eval_split_scoring_and_chance():
    train = {c.image for c in demo.train_set(4000, 0)[0]}
    items = demo.eval_set(200)
    assert len(items) == 200 and not train & {conv.image for conv, _ in items}
    for conv, expected in items:
        assert conv.turns[-1].answer == "" and conversation.prompt(conv).endswith("### Response:\n")
        assert any(expected in answers for answers in demo.ANSWERS.values())
    # the held-out questions ask every kind of one shape and of several, each kind about as often
    held_out = {(demo.KIND[e], len(json.loads(conv.image[5:])["shapes"])) for conv, e in items}
    assert held_out == {(k, n) for k in demo.ANSWERS for n in range(1, len(demo.COUNTS) + 1)}
    assert all(30 <= [demo.KIND[e] for _, e in items].count(k) <= 70 for k in demo.ANSWERS)
    chance = demo.chance([e for _, e in items])
    assert 0.2 < chance < 0.3
    kinds = [next(k for k, v in demo.ANSWERS.items() if e in v) for _, e in items]
    assert abs(chance - np.mean([1 / len(demo.ANSWERS[k]) for k in kinds])) < 1e-12
    assert demo.answer_matches(" Red. ", "red") and demo.answer_matches("3", "3.")
    assert not demo.answer_matches("red square", "red") and not demo.answer_matches("", "red")


def test_demo_corpus_and_tokenizer(tmp_path):
    lines = demo.corpus()
    assert conversation.HEADER in lines and not any("<image>" in l or "</s>" in l or "\n" in l for l in lines)
    tok = Tokenizer(demo.tokenizer(str(tmp_path / "demo")))
    conv = demo.train_set(20, 0)[0][0]
    ids, labels = data.render(conv, tok)
    assert tok.decode(ids[1:]) == conversation.prompt(conv).replace("\n<image>\n\n", "<image>")   # stripped around it
    assert tok.sp.unk_id() not in ids


def test_pictures_are_drawn_into_files_that_data_reads(tmp_path):
    """materialise: PNG files with exactly draw()'s pixels, one per distinct scene, read by conversation.load_image."""
    vl, _ = demo.train_set(20, 0)
    files, _ = demo.train_set(20, 0, pictures=str(tmp_path))
    assert [c.turns for c in files] == [c.turns for c in vl]
    for scene, conv in zip(vl, files):
        assert conv.image.startswith(str(tmp_path)) and conv.image.endswith(".png")
        assert np.array_equal(np.asarray(conversation.load_image(conv.image)), np.asarray(demo.draw(scene.image)))
    assert len(list(tmp_path.iterdir())) == len({c.image for c in vl})     # nothing else left there
    again, _ = demo.train_set(20, 0, pictures=str(tmp_path))                # a second run reuses the files
    assert [c.image for c in again] == [c.image for c in files]
    items = demo.eval_set(5, pictures=str(tmp_path))
    assert [e for _, e in items] == [e for _, e in demo.eval_set(5)] and all(c.image.endswith(".png") for c, _ in items)


def test_score_per_question_kind():
    expected = ["red", "blue", "3", "circle"]
    out = demo.score(expected, ["Red.", "red", "3", "square"])
    assert out == {"accuracy": 0.5, "chance": demo.chance(expected), "accuracy_shape": 0.0,
                   "accuracy_colour": 0.5, "accuracy_count": 1.0}
    assert demo.chance(expected) == (1 / 6 + 1 / 6 + 1 / 3 + 1 / 3) / 4     # 6 colours, 3 counts, 3 shapes
