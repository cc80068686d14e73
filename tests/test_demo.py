"""demo.py: the built-in demo set (pictures, questions, held-out split, scoring, tokenizer corpus)."""
import json

import numpy as np

import data
import demo


def test_demo_set_is_deterministic():
    a, b, c = demo.train_set(300, 100, seed=0), demo.train_set(300, 100, seed=0), demo.train_set(
        300, 100, seed=1)
    assert a == b and a != c
    assert np.array_equal(np.asarray(demo.draw(a[0][5].image)), np.asarray(demo.draw(b[0][5].image)))
    assert demo.eval_set(50) == demo.eval_set(50)


def test_demo_answers_follow_the_pictures():
    vl, lang = demo.train_set(400, 200)
    kinds = set()
    for conv in vl:
        scene = json.loads(conv.image[len("demo:"):])
        pixels = np.asarray(demo.draw(conv.image)).astype(int)
        assert pixels.shape == (demo.SIZE, demo.SIZE, 3)
        for shape, colour, cx, cy, r in scene["shapes"]:
            assert (pixels[cy + r // 2, cx] == demo.COLOURS[colour]).all()   # drawn where the scene says
        assert 1 <= len(conv.turns) <= 3
        words = {w.strip("?").lower() for t in conv.turns for w in t.question.split()}
        assert not words & {t.answer for t in conv.turns}    # no question gives away an answer
        for t in conv.turns:
            if t.question.startswith("How many"):
                kinds.add("count")
                assert t.answer == str(len(scene["shapes"]))
            elif "colo" in t.question:
                kinds.add("colour")
                assert {s[1] for s in scene["shapes"]} == {t.answer}
            elif "shape" in t.question and t.question.startswith(("What shape", "Which shape")):
                kinds.add("shape")
                assert {s[0] for s in scene["shapes"]} == {t.answer}
            else:
                kinds.add("position")
                ((_, _, cx, cy, _),) = scene["shapes"]
                fx, fy = demo.POSITIONS[t.answer]
                assert abs(cx - fx * demo.SIZE) <= 2 and abs(cy - fy * demo.SIZE) <= 2
    assert kinds == {"count", "colour", "shape", "position"}
    assert any(len(c.turns) > 1 for c in vl) and all(c.image is None for c in lang)
    assert any(t.input for c in lang for t in c.turns)
    # every answer of each type occurs
    answers = {t.answer for c in vl for t in c.turns}
    assert answers == {a for v in demo.ANSWERS.values() for a in v}


def test_demo_eval_split_scoring_and_chance():
    train = {c.image for c in demo.train_set(4000, 0)[0]}
    items = demo.eval_set(200)
    assert len(items) == 200 and not train & {conv.image for conv, _ in items}
    for conv, expected in items:
        assert conv.turns[-1].answer == "" and data.prompt(conv).endswith("### Response:\n")
        assert any(expected in answers for answers in demo.ANSWERS.values())
    chance = demo.chance([e for _, e in items])
    assert 0.2 < chance < 0.3
    kinds = [next(k for k, v in demo.ANSWERS.items() if e in v) for _, e in items]
    assert abs(chance - np.mean([1 / len(demo.ANSWERS[k]) for k in kinds])) < 1e-12
    assert demo.answer_matches(" Red. ", "red") and demo.answer_matches("3", "3.")
    assert not demo.answer_matches("red square", "red") and not demo.answer_matches("", "red")


def test_demo_corpus_and_tokenizer(tmp_path):
    import mmgpt
    lines = demo.corpus()
    assert data.HEADER in lines and not any("<image>" in l or "</s>" in l or "\n" in l for l in lines)
    tok = mmgpt.Tokenizer(demo.tokenizer(str(tmp_path / "demo")))
    conv = demo.train_set(20, 0)[0][0]
    ids, labels = data.render(conv, tok)
    assert tok.decode(ids[1:]) == data.prompt(conv).replace("\n<image>\n\n", "<image>")   # stripped around it
    assert tok.sp.unk_id() not in ids


def test_pictures_are_drawn_into_files_that_data_reads(tmp_path):
    """materialise: PNG files with exactly draw()'s pixels, one per distinct scene, read by data.load_image."""
    vl, _ = demo.train_set(20, 0)
    files, _ = demo.train_set(20, 0, pictures=str(tmp_path))
    assert [c.turns for c in files] == [c.turns for c in vl]
    for scene, conv in zip(vl, files):
        assert conv.image.startswith(str(tmp_path)) and conv.image.endswith(".png")
        assert np.array_equal(np.asarray(data.load_image(conv.image)), np.asarray(demo.draw(scene.image)))
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
    assert demo.chance(expected) == (1 / 6 + 1 / 6 + 1 / 4 + 1 / 3) / 4
