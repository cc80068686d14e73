"""chat.py, driven as a subprocess on a tiny model saved in the real formats: its greedy answers equal a greedy
decode that runs a full forward (no cache) over the rendered conversation at every step. In-process: the KV cache
is kept across rounds, long conversations drop their oldest rounds, Ctrl-C ends an answer, not the session."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import chat
import checkpoints
import conversation
import lora
import options
import quantize
from conftest import full_forward_greedy, tiny_release
from engine import Engine, Sampling

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chat.py")
Q1, Q2, Q3 = "what colour is the square?", "how many circles are there?", "and what shape is on the left?"
IMAGE_BLOCK = "\n\n### Image:\n<image>"     # the paper's template, written out here to check chat.py against


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model, tokenizer):
    return tiny_release(tmp_path_factory.mktemp("chat"), sp_model, tokenizer)


def weight_args(*argv):
    """The weight flags as chat.py, eval.py and serve.py parse them."""
    ap = argparse.ArgumentParser()
    options.add_weight_args(ap)
    return ap.parse_args(argv)


def reference(files, text: str, pictures: list[str], max_new_tokens: int) -> list[int]:
    """Greedy decoding with a full forward (no cache) over the whole sequence at every step."""
    model, tok = files["model"], files["tokenizer"]
    ids = tok.encode(text)
    assert ids.count(tok.image_id) == len(pictures)
    images = torch.stack([files["transform"](conversation.load_image(p)) for p in pictures])[None] if pictures else None
    return full_forward_greedy(model, ids, images, max_new_tokens, tok.never_generate, tok.eos_id)


def run_chat(*args, stdin=None, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")     # a tiny model: threads only cost start-up time
    return subprocess.run([sys.executable, CHAT, *args], input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def answers(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def no_special(files, rec):
    tok = files["tokenizer"]
    assert not any(s in rec["text"] for s in tok.special), rec
    assert not set(rec["ids"]) & set(tok.never_generate + [tok.eos_id]), rec
    assert rec["text"] == tok.decode(rec["ids"])


def turns(*pairs):
    return [conversation.Turn(q, a) for q, a in pairs]


# -- the CLI --------------------------------------------------------------------------------------------------

def test_two_greedy_rounds_equal_a_full_forward_over_the_conversation(files):
    r = run_chat(files["pic1"], "--ckpt", files["run"], "--greedy", "--json", "--max-new-tokens", "12",
                 "--prompt", Q1, "--prompt", Q2)
    a1, a2 = answers(r)
    assert (a1["prompt"], a2["prompt"]) == (Q1, Q2)
    conv = conversation.Conversation(files["pic1"], turns((Q1, "")))
    assert a1["ids"] == reference(files, conversation.prompt(conv), [files["pic1"]], 12)
    # The first answer was cut at the limit and is closed all the same. Its text tokenises otherwise than the ids
    # that were sampled: the context is the rendered text, as the reference stack (text in, text out) has it.
    assert len(a1["ids"]) == 12 and files["tokenizer"].encode(a1["text"], bos=False) != a1["ids"]
    conv.turns = turns((Q1, a1["text"]), (Q2, ""))
    assert conversation.prompt(conv).count("</s>") == 1
    assert a2["ids"] == reference(files, conversation.prompt(conv), [files["pic1"]], 12)
    for rec in (a1, a2):
        no_special(files, rec)


def test_the_programs_load_a_model_with_its_lora_merged(files):
    """options.load_model (chat.py, eval.py, serve.py): every LoRA layer merged into its weight, the logits
    those of the run's model with the factors apart (load_run, as training has it)."""
    merged, tok, transform, _ = options.load_model(weight_args("--ckpt", files["run"]), "cpu")
    apart = checkpoints.load_run(files["run"])[0]
    assert lora.lora_layers(merged) and all(m.merged for m in lora.lora_layers(merged))
    assert not any(m.merged for m in lora.lora_layers(apart))
    ids = tok.encode(conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, "")))))
    images = transform(conversation.load_image(files["pic1"]))[None, None]
    with torch.no_grad():
        expected = apart(images, torch.tensor([ids]))
        torch.testing.assert_close(merged(images, torch.tensor([ids])), expected, rtol=1e-5, atol=1e-5)
        for m in lora.lora_layers(apart):     # the factors are not zero: without them the logits move
            m.lora_B.zero_()
        assert (apart(images, torch.tensor([ids])) - expected).abs().max() > 1e-2


def test_int8_chat_answers_as_the_quantized_model_does(files):
    """chat.py --int8: LoRA merged, the decoder in int8 (quantize.py); its greedy answer is that model's own full
    forward decode (here the same as the fp32 model's), and the model chat loads with --int8 is quantized."""
    r = run_chat(files["pic1"], "--ckpt", files["run"], "--int8", "--greedy", "--json", "--max-new-tokens", "12",
                 "--prompt", Q1)
    (a1,) = answers(r)
    quantized = quantize.quantize(checkpoints.load_run(files["run"])[0]).eval()
    text = conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, ""))))
    assert a1["ids"] == reference(dict(files, model=quantized), text, [files["pic1"]], 12)
    model = options.load_model(weight_args("--ckpt", files["run"], "--int8"), "cpu")[0]
    assert isinstance(model.lm_head, quantize.Int8Linear) and model.lm_head.codes.dtype == torch.int32


@pytest.mark.skipif(not quantize.fbgemm_fp16(), reason="fbgemm's fp16 kernels need an x86 CPU with AVX2")
def test_fp16_chat_answers_as_fbgemms_layers_do(files):
    """chat.py --dtype fp16 on a CPU: the decoder's layers packed for fbgemm's fp16 kernels (the ViT and perceiver in
    fp32); each token of its greedy answer is that model's full forward's argmax, to fp16's rounding (the cache and
    the full forward round in different places: a near tie may go either way)."""
    r = run_chat(files["pic1"], "--ckpt", files["run"], "--dtype", "fp16", "--greedy", "--json", "--max-new-tokens",
                 "12", "--prompt", Q1)
    (a1,) = answers(r)
    model = options.load_model(weight_args("--ckpt", files["run"], "--dtype", "fp16"), "cpu")[0]
    assert isinstance(model.lm_head, quantize.Fp16Linear) and model.embed_tokens.weight.dtype == torch.float16
    assert next(model.vision.parameters()).dtype == torch.float32
    ids = files["tokenizer"].encode(conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, "")))))
    images = files["transform"](conversation.load_image(files["pic1"]))[None, None]
    with torch.no_grad():
        logits = model(images, torch.tensor([ids + a1["ids"]]))[0, len(ids) - 1:-1].float()
    assert len(a1["ids"]) == 12
    chosen = logits.gather(1, torch.tensor(a1["ids"])[:, None])[:, 0]
    assert ((logits.amax(1) - chosen) <= 2e-3 * logits.abs().amax(1)).all(), (logits.amax(1) - chosen).tolist()
    # --fast compiles the decoder as one graph, which fbgemm's packed weights cannot enter: refused before loading.
    r = run_chat(files["pic1"], "--ckpt", files["run"], "--dtype", "fp16", "--fast", "--prompt", Q1)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "dtype fp16 (--dtype)", "error: --fast compiles the decoder as one graph, which fbgemm's packed fp16 layers "
        "(fp16 on a CPU) cannot enter: --no-fast, or --dtype bf16"]


def test_piped_rounds_new_picture_and_bad_input(files):
    lines = [Q1, f"/image {files['pic1']}.missing", f"/image {files['broken']}", Q2, "what is <image> here?",
             f"/image {files['pic2']}", Q3]
    r = run_chat(files["pic1"], "--llama", files["llama"], "--openflamingo", files["openflamingo"],
                 "--lora", files["release"], "--vision", files["vision"], "--vision-weights", files["vision_weights"],
                 "--greedy", "--json", "--max-new-tokens", "10", stdin="\n".join(lines) + "\n")
    a1, a2, a3 = answers(r)
    assert "pic1.png.missing" in r.stderr and "broken.png" in r.stderr and "<image>" in r.stderr
    pics = [files["pic1"]]
    text = conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, ""))))
    assert a1["ids"] == reference(files, text, pics, 10)
    text = conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, a1["text"]), (Q2, ""))))
    assert a2["ids"] == reference(files, text, pics, 10)
    # The new picture's block goes before the next question; the tokens between the two pictures now see it.
    text = conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, a1["text"]), (Q2, a2["text"])))) + \
        f"{IMAGE_BLOCK}\n\n### Instruction:\n{Q3}\n\n### Response:\n"
    assert a3["ids"] == reference(files, text, pics + [files["pic2"]], 10)
    assert a3["ids"] != reference(files, text, pics + [files["pic1"]], 10)     # the new picture matters
    for rec in (a1, a2, a3):
        no_special(files, rec)


def link(src: str, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(src, dst)


def test_release_layout_is_found_and_language_only_chat_is_printed(files, tmp_path):
    link(files["llama"], tmp_path / "checkpoints/llama-7b_hf")
    link(files["openflamingo"], tmp_path / "checkpoints/OpenFlamingo-9B/checkpoint.pt")
    link(files["release"], tmp_path / "checkpoints/mmgpt-lora-v0-release.pt")
    r = run_chat("--vision", files["vision"], "--vision-weights", files["vision_weights"], "--greedy",
                 "--max-new-tokens", "10", stdin=f"{Q1}\n\n{Q2}\n", cwd=tmp_path)
    assert r.returncode == 0 and "using checkpoints/llama-7b_hf" in r.stderr
    a1 = reference(files, conversation.prompt(conversation.Conversation(None, turns((Q1, "")))), [], 10)
    t1 = files["tokenizer"].decode(a1)
    a2 = reference(files, conversation.prompt(conversation.Conversation(None, turns((Q1, t1), (Q2, "")))), [], 10)
    assert r.stdout == t1 + "\n" + files["tokenizer"].decode(a2) + "\n"


def test_weights_are_looked_for_in_the_documented_places(files, tmp_path, monkeypatch):
    args = weight_args()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        options.find_weights(args)
    for what in ("--ckpt", "--llama", "checkpoints/llama-7b_hf", "checkpoints/OpenFlamingo-9B/checkpoint.pt",
                 "huggingface.co/openflamingo/OpenFlamingo-9B", "mmgpt-lora-v0-release.pt", "runs/demo"):
        assert what in str(e.value)
    link(files["run"], tmp_path / "runs/demo")
    assert options.find_weights(args) == {"run": "runs/demo"}
    link(files["llama"], tmp_path / "checkpoints/llama-7b_hf")
    link(files["openflamingo"], tmp_path / "checkpoints/OpenFlamingo-9B/checkpoint.pt")
    assert options.find_weights(args) == {"run": "runs/demo"}    # the release is used only when all of it is there
    link(files["release"], tmp_path / "checkpoints/mmgpt-lora-v0-release.pt")
    assert options.find_weights(args) == checkpoints.RELEASE
    args.ckpt = files["run"]
    assert options.find_weights(args) == {"run": files["run"]}


# -- in-process: the cache, long conversations, interruptions -------------------------------------------------

def new_chat(files, model=None, max_new_tokens=8, **engine):
    return chat.Chat(Engine(model or files["model"], files["tokenizer"], **engine), files["transform"], max_new_tokens,
                     Sampling(greedy=True))


def budget(c: chat.Chat, tokenizer) -> int:
    """The new tokens the last answer could take: max_new_tokens, or what the context had left."""
    return min(c.max_new_tokens, c.engine.max_len - len(tokenizer.encode(open_text(c))))


def open_text(c: chat.Chat) -> str:
    """What the model saw for the last answer: the conversation with that answer open again."""
    last = c.parts[-1].turns[-1]
    answer, last.answer = last.answer, ""
    try:
        return c.text()
    finally:
        last.answer = answer


def test_cache_kept_across_rounds_and_pictures_encoded_once(files, monkeypatch):
    c = new_chat(files)
    submitted, encoded = [], []
    submit, encode_images = c.engine.submit, c.engine.runner.model.encode_images
    monkeypatch.setattr(c.engine, "submit", lambda request: submitted.append(request) or submit(request))
    monkeypatch.setattr(c.engine.runner.model, "encode_images", lambda images: encoded.append(images.shape[1]) or
                        encode_images(images))
    c.add_picture(files["pic1"])
    got = [c.ask(Q1)]
    round1 = files["tokenizer"].encode(open_text(c))
    got.append(c.ask(Q2))
    # Round 2 feeds only what follows round 1's prompt: at most the first answer (re-tokenised) and its own text.
    assert submitted[1].cached >= len(round1)
    c.add_picture(files["pic2"])
    got.append(c.ask(Q3))
    monkeypatch.undo()
    assert encoded == [1, 1]    # each picture's features once
    assert got[-1] == reference(files, open_text(c), [files["pic1"], files["pic2"]], 8)
    ids = files["tokenizer"].encode(open_text(c))
    assert c.engine.slots[0].ids[:len(ids)] == ids


def test_long_conversation_drops_the_oldest_rounds_and_keeps_the_picture(files, tokenizer, capsys):
    model = checkpoints.load(files["llama"], files["openflamingo"], files["release"], files["vision"],
                            files["vision_weights"])[0]
    model.cfg.max_seq_len = 120     # a short context (the rope tables are longer: that does not matter)
    c = new_chat(files, model, max_new_tokens=10)
    c.add_picture(files["pic1"])
    for i in range(8):
        got = c.ask(f"{Q1} {i}")
        assert got == reference(files, open_text(c), [files["pic1"]], budget(c, tokenizer))
    err = capsys.readouterr().err
    assert "[context full: dropped the oldest round]" in err
    text = c.text()
    assert text.startswith(conversation.HEADER + IMAGE_BLOCK) and f"{Q1} 7" in text and f"{Q1} 0\n" not in text
    # A second picture: once every turn about the first has gone, the first picture goes with them.
    c.add_picture(files["pic2"])
    for i in range(6):
        got = c.ask(f"{Q2} {i}")
        pictures = [files["pic1"], files["pic2"]][2 - len(c.pixels):]
        assert got == reference(files, open_text(c), pictures, budget(c, tokenizer))
    assert len(c.pixels) == 1 and c.text().count("<image>") == 1


def test_long_conversation_that_started_without_a_picture(files, tokenizer):
    model = checkpoints.load(files["llama"], files["openflamingo"], files["release"], files["vision"],
                            files["vision_weights"])[0]
    model.cfg.max_seq_len = 120
    c = new_chat(files, model, max_new_tokens=4)
    c.ask(Q1)
    c.add_picture(files["pic1"])
    for i in range(4):  # the language-only round goes first, and the cached picture moves to the front
        got = c.ask(f"{Q3} {i}")
        assert got == reference(files, open_text(c), [files["pic1"]], 4)
    assert c.text().startswith(conversation.HEADER + IMAGE_BLOCK) and Q1 not in c.text()


def test_question_too_long_or_with_special_tokens_is_refused(files, capsys):
    c = new_chat(files)
    first = c.ask(Q1)
    assert c.ask("the cat " * 200) is None
    assert c.parts[0].turns == turns((Q1, files["tokenizer"].decode(first)))    # the conversation is kept
    assert c.ask("what is <image>?") is None and c.ask("stop </s> here") is None
    err = capsys.readouterr().err
    assert "not answered" in err and "rephrase" in err
    assert c.ask(Q2) == reference(files, open_text(c), [], 8)


def interrupt_sampling(c: chat.Chat, at: int):
    """Ctrl-C during an answer: the engine's sampler raises KeyboardInterrupt on its at-th call from now."""
    choose, calls = c.engine.runner.greedy, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return choose(*args)

    c.engine.runner.greedy = interrupted


def test_ctrl_c_ends_the_answer_not_the_session(files, monkeypatch, capsys):
    c = new_chat(files)
    c.add_picture(files["pic1"])
    interrupt_sampling(c, at=4)
    partial = c.ask(Q1)
    assert len(partial) == 3 and "[stopped]" in capsys.readouterr().err
    got = c.ask(Q2)
    assert files["tokenizer"].decode(partial) + "</s>" in c.text()
    assert got == reference(files, open_text(c), [files["pic1"]], 8)

    # Stopped inside the prefill of a round that brings a picture: the slot keeps a valid prefix.
    c.add_picture(files["pic2"])

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(c.engine.runner, "prefill_step", stop)
    assert c.ask(Q3) == []
    monkeypatch.undo()
    slot = c.engine.slots[0]
    assert slot.ids == files["tokenizer"].encode(c.text())[:len(slot.ids)] and slot.request is None
    got = c.ask(Q1)
    assert got == reference(files, open_text(c), [files["pic1"], files["pic2"]], 8)


def scripted_answer(c: chat.Chat, question: str, tokens: list[int]) -> list[int] | None:
    """Ask, the engine's sampler returning these tokens one per call, whatever the model says."""
    left, choose = iter(tokens), c.engine.runner.greedy
    c.engine.runner.greedy = lambda logits, banned: torch.tensor([next(left)])
    try:
        return c.ask(question)
    finally:
        c.engine.runner.greedy = choose


def test_answer_ends_before_a_spelled_out_special_string(files):
    tok = files["tokenizer"]
    c = new_chat(files)
    spelled = tok.sp.encode("red <image> and </s> blue")    # ordinary pieces that spell special strings
    got = scripted_answer(c, Q1, spelled)
    text = tok.decode(got)
    assert text.startswith("red") and not any(s in text for s in tok.special)
    assert got == spelled[:len(got)] and len(got) < len(spelled)
    assert c.ask(Q2) == reference(files, open_text(c), [], 8)


def test_an_empty_answer_is_closed_too(files):
    c = new_chat(files)
    c.add_picture(files["pic1"])
    assert scripted_answer(c, Q1, [files["tokenizer"].eos_id]) == []
    c.add_picture(files["pic2"])
    got = c.ask(Q2)
    text = conversation.prompt(conversation.Conversation(files["pic1"], turns((Q1, "")))) + \
        f"</s>{IMAGE_BLOCK}\n\n### Instruction:\n{Q2}\n\n### Response:\n"
    assert open_text(c) == text
    assert got == reference(files, text, [files["pic1"], files["pic2"]], 8)


def scripted_chat(c: chat.Chat, files) -> list:
    """Rounds across a picture brought in later, a Ctrl-C in an answer and the oldest rounds dropped."""
    c.add_picture(files["pic1"])
    got = [c.ask(Q1), c.ask(Q2)]
    c.add_picture(files["pic2"])
    interrupt_sampling(c, at=3)
    got.append(c.ask(Q3))
    got += [c.ask(f"{Q1} {i}") for i in range(4)]
    assert len(c.pixels) == 1 and len(got[2]) == 2    # the first picture's rounds were dropped; Ctrl-C took effect
    return got


def test_fast_path_answers_equal_the_eager_path(files, capsys):
    """The engine's fast path (LoRA merged, decode step and bucketed prefill compiled; here with a CPU backend that
    traces the same full graphs): the same greedy answers as the eager path, round after round."""
    answers = []
    for fast in (False, True):
        model = checkpoints.load(files["llama"], files["openflamingo"], files["release"], files["vision"],
                                 files["vision_weights"])[0]
        model.cfg.max_seq_len = 160     # a short context: the oldest rounds get dropped
        c = new_chat(files, model, max_new_tokens=10, fast=fast, backend="aot_eager")
        assert all(m.merged for m in lora.lora_layers(model)) == fast
        answers.append(scripted_chat(c, files))
    assert answers[0] == answers[1]
    assert "[context full" in capsys.readouterr().err
