"""The fault battery (issue 14): every kind of file a user hands in (LLaMA directory and its shards, OpenFlamingo
checkpoint, LoRA file, CLIP weights, ckpt.pt, annotation files, pictures, chat input), missing, empty, truncated,
in the wrong format, with wrong shapes, in the wrong encoding or as a malicious pickle, gets a named error (file,
record, field), never a traceback, and runs no code. Writes are atomic, and a training run killed with SIGKILL at
random moments resumes to the weights of an uninterrupted one."""
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import conversation
import chat
import checkpoints
import data
import demo
import lora as lora_lib
from checkpoints import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exploit:
    """A pickle that runs a shell command when loaded: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The demo's random base model in the real formats, and a lora.pt and ckpt.pt made on it."""
    tmp = tmp_path_factory.mktemp("faults")
    paths = demo.make_base(str(tmp), seed=0)
    model, _, _ = checkpoints.load(**paths)
    lora_lib.inject(model, 4, 16, 0.0, lora_lib.DEFAULT_TARGETS, within="layers.")
    settings = {"lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "lora_targets": list(lora_lib.DEFAULT_TARGETS)}
    checkpoints.save_lora(model, str(tmp / "lora.pt"), settings)
    state = {k: 0 for k in checkpoints.TRAIN_STATE_KEYS}
    checkpoints.save_train_state(state, str(tmp / "ckpt.pt"))
    return {**paths, "lora": str(tmp / "lora.pt"), "ckpt": str(tmp / "ckpt.pt"), "tmp": tmp}


# ----------------------------------------------------------------------------------------------------------------
# Weight files. Each kind: where it comes from, how it is loaded, and a tensor whose shape can be made wrong.

def reshaped(tensors: dict, name_part: str) -> dict:
    """The same tensors, copied out of the memory-mapped file they came from (it is about to be overwritten), with
    those whose names hold name_part given an extra row."""
    return {k: torch.cat([t, t[:1]]) if name_part in k else t.clone() for k, t in tensors.items()}


def prepare(kind: str, base, tmp) -> tuple[str, callable, callable]:
    """(the file to damage, load() using it, write(tensors-of-wrong-shape) into it) for one kind of file."""
    llama, of, lora, vw = base["llama"], base["openflamingo"], base["lora"], base["vision_weights"]
    if kind in ("llama_safetensors", "llama_bin", "llama_config", "llama_index", "tokenizer"):
        llama = str(tmp / "llama")
        shutil.copytree(base["llama"], llama)
        st = os.path.join(llama, "model.safetensors")
        if kind == "llama_bin":
            torch.save(dict(checkpoints.read_safetensors(st)), os.path.join(llama, "pytorch_model.bin"))
            os.remove(st)
        if kind == "llama_index":
            tensors = checkpoints.read_safetensors(st)
            os.rename(st, os.path.join(llama, "model-00001-of-00001.safetensors"))
            with open(os.path.join(llama, "model.safetensors.index.json"), "w") as f:
                json.dump({"weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}, f)
        file = os.path.join(llama, {"llama_safetensors": "model.safetensors", "llama_bin": "pytorch_model.bin",
                                    "llama_config": "config.json", "llama_index": "model.safetensors.index.json",
                                    "tokenizer": "tokenizer.model"}[kind])
    elif kind in ("openflamingo", "lora", "vision_weights", "ckpt"):
        file = str(tmp / os.path.basename(base[kind]))
        shutil.copyfile(base[kind], file)
        of, lora, vw = (file if kind == k else v for k, v in (("openflamingo", of), ("lora", lora),
                                                              ("vision_weights", vw)))
    else:
        raise AssertionError(kind)

    def load():
        if kind == "ckpt":
            return checkpoints.read_train_state(file)
        return checkpoints.load(llama=llama, openflamingo=of, lora=lora, vision=base["vision"], vision_weights=vw)

    def write_wrong_shapes():
        if kind in ("llama_safetensors", "llama_bin"):
            tensors = reshaped(dict(checkpoints.read_checkpoint(file)), "mlp.down_proj")
            (checkpoints.save_safetensors if kind == "llama_safetensors" else torch.save)(tensors, file)
        elif kind == "openflamingo":
            torch.save(reshaped(checkpoints.read_checkpoint(file), "attn.to_kv"), file)
        elif kind == "vision_weights":
            torch.save(reshaped(checkpoints.read_checkpoint(file), "conv1"), file)
        elif kind == "lora":
            ckpt = checkpoints.read_checkpoint(file)
            ckpt = {**ckpt, "weights": reshaped(ckpt["weights"], "lora_A")}
            torch.save(ckpt, file)
        elif kind == "llama_config":
            c = json.load(open(file))
            with open(file, "w") as f:
                json.dump({**c, "hidden_size": c["hidden_size"] * 2}, f)
        elif kind == "llama_index":
            with open(file, "w") as f:
                json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
        elif kind == "ckpt":
            torch.save({"format": "mmgpt-train-state", "step": 3}, file)  # keys missing
        elif kind == "tokenizer":
            with open(file, "wb") as f:
                f.write(b"\x0a\x03abc")  # a protobuf, not a sentencepiece model
    return file, load, write_wrong_shapes


KINDS = ("llama_safetensors", "llama_bin", "llama_config", "llama_index", "tokenizer", "openflamingo", "lora",
         "vision_weights", "ckpt")
FAULTS = ("missing", "empty", "truncated", "garbage", "not_utf8", "pickle", "wrong_shapes")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_file_fault_is_a_named_error_and_runs_no_code(base, tmp_path, kind, fault):
    file, load, write_wrong_shapes = prepare(kind, base, tmp_path)
    marker = tmp_path / "pwned"
    good = open(file, "rb").read()
    if fault == "missing":
        os.remove(file)
    elif fault == "wrong_shapes":
        write_wrong_shapes()
    else:
        with open(file, "wb") as f:
            f.write({"empty": b"", "truncated": good[:len(good) // 2], "garbage": b"not a weights file\n" * 50,
                     "not_utf8": b"\xff\xfe\x00{" * 50}.get(fault, b""))
        if fault == "pickle":
            torch.save({"weights": {}, "model_state_dict": {}, "x": Exploit(marker)}, file)
    with pytest.raises((CheckpointError, FileNotFoundError)) as e:
        load()
    message = str(e.value)
    # The named file is the damaged one; a LLaMA directory without weights is named itself; an index naming a
    # shard that is not there names the shard.
    if fault == "missing" and kind in ("llama_safetensors", "llama_bin", "llama_index"):
        file = os.path.dirname(file)
    if fault == "wrong_shapes" and kind == "llama_config":  # the weights then disagree with the config
        file = os.path.join(os.path.dirname(file), "model.safetensors")
    assert file in message or (kind == "llama_index" and "model-00002-of-00002" in message), message
    assert not marker.exists(), "a pickle in a user's file ran code"


def test_train_state_of_another_program_is_named(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"world": 1}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: not a mmgpt training state \\(no format"):
        checkpoints.read_train_state(path)
    torch.save({"format": "mmgpt-train-state", "step": 1}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: not a mmgpt training state \\(missing keys: bad_steps, "):
        checkpoints.read_train_state(path)


def test_train_state_round_trips_rng_states_with_weights_only(tmp_path):
    import train
    torch.manual_seed(5)
    rng = train.rng_state()
    before = (torch.rand(3), random.random(), float(np.random.rand()))
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_train_state({**{k: 0 for k in checkpoints.TRAIN_STATE_KEYS}, "rng": [rng]}, path)
    torch.load(path, weights_only=True)  # plain data only
    train.set_rng_state(checkpoints.read_train_state(path)["rng"][0])
    after = (torch.rand(3), random.random(), float(np.random.rand()))
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


# ----------------------------------------------------------------------------------------------------------------
# safetensors: our own reader and writer (no package, no code)

def test_safetensors_round_trip_every_dtype(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(), "f16": torch.randn(7).half(),
               "i64": torch.arange(-3, 6).reshape(3, 3), "u8": torch.arange(5, dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "strided": torch.randn(4, 6).t()}
    checkpoints.save_safetensors(tensors, path)
    back = checkpoints.read_safetensors(path)
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    raw = open(path, "rb").read()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # the body starts aligned, so tensors map in place
    back["f32"] += 1  # copy-on-write: the file does not change
    assert open(path, "rb").read() == raw


def test_safetensors_layout_is_the_published_one(tmp_path):
    path = str(tmp_path / "t.safetensors")
    checkpoints.save_safetensors({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[7]], dtype=torch.int64)}, path)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header == {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "I64", "shape": [1, 1], "data_offsets": [8, 16]}}
    assert raw[8 + n:] == torch.tensor([1.0, 2.0]).numpy().tobytes() + (7).to_bytes(8, "little")


def test_safetensors_agree_with_the_safetensors_package_both_ways(tmp_path):
    st = pytest.importorskip("safetensors.torch")  # not a requirement: checked against it where it is installed
    tensors = {"w": torch.randn(3, 4).bfloat16(), "b": torch.randn(4), "i": torch.arange(6).reshape(2, 3)}
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    checkpoints.save_safetensors(tensors, ours)
    st.save_file(tensors, theirs)
    for read in (st.load_file(ours), checkpoints.read_safetensors(theirs)):
        assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("header, message", [
    (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "do not hold [4] F32"),
    (b'{"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}', "bad header entry"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "do not hold [-1] F32"),
    (b'[1, 2]', "header is not a JSON object"),
    (b'{"a": ', "header is not JSON")])
def test_safetensors_bad_headers_are_named(tmp_path, header, message):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=f"^{path}: .*" + message.replace("[", "\\[").replace("]", "\\]")):
        checkpoints.read_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.atomic_save({"a": 1}, path)

    def dies_halfway(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(path, dies_halfway)
    assert torch.load(path, weights_only=True) == {"a": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


# ----------------------------------------------------------------------------------------------------------------
# Annotation files and pictures

# One valid record of each source's format, and a text field in it.
RECORDS = {
    "llava": ([{"image": "1.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                     {"from": "gpt", "value": "A cat."}]}],
              lambda r, s: r[0]["conversations"][1].update(value=s), "conversations[1].value"),
    "dolly": ([{"instruction": "Say hi.", "context": "", "response": "Hi."}],
              lambda r, s: r[0].update(response=s), "response"),
    "alpaca_gpt4": ([{"instruction": "Say hi.", "input": "", "output": "Hi."}],
                    lambda r, s: r[0].update(instruction=s), "instruction"),
}


def write_annotations(kind, path, records):
    with open(path, "w") as f:
        if kind == "dolly":
            f.write("".join(json.dumps(r) + "\n" for r in records))
        else:
            json.dump(records, f)


@pytest.mark.parametrize("kind", list(RECORDS))
def test_a_lone_surrogate_names_file_record_and_field(tmp_path, kind):
    records, put, field = RECORDS[kind]
    records = json.loads(json.dumps(records))
    put(records, "fine \ud800 text")
    path = str(tmp_path / ("ann.jsonl" if kind == "dolly" else "ann.json"))
    write_annotations(kind, path, records)
    (tmp_path / "1.png").write_bytes(b"")
    where = f"{path} line 1" if kind == "dolly" else f"{path} record 0"
    with pytest.raises(data.DataError, match=f"^{where}: field '{field.replace('[', '.').replace(']', '.')}': "
                                             f"a lone surrogate \\(\\\\ud800\\) at character 5 is not text$"):
        data.read(kind, path, str(tmp_path))
    errors = []
    assert data.read(kind, path, str(tmp_path), errors=errors) == [] and len(errors) == 1


def test_check_and_skip_bad_report_a_lone_surrogate(tmp_path, capsys, sp_model):
    dolly = str(tmp_path / "dolly.jsonl")
    write_annotations("dolly", dolly, [{"instruction": "Say hi.", "context": "", "response": "Hi."},
                                       {"instruction": "Say \ud800.", "context": "", "response": "Hi."}])
    llava = str(tmp_path / "llava.json")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    write_annotations("llava", llava, RECORDS["llava"][0])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"vl": [{"kind": "llava", "ann": [llava], "image_root": str(tmp_path)}],
                               "lang": [{"kind": "dolly", "ann": [dolly]}]}))
    assert data.main([str(cfg), "--check", "--tokenizer", sp_model]) == 1
    out = capsys.readouterr().out
    assert f"{dolly} line 2: field 'instruction': a lone surrogate" in out
    mix = data.load_mix(str(cfg), skip_bad=True)
    assert len(mix.errors) == 1 and len(mix.lang) == 1


@pytest.mark.parametrize("kind", sorted(data.READERS))
@pytest.mark.parametrize("fault, message", [
    ("missing", "annotation file not found"), ("empty", "empty file"), ("truncated", "malformed JSON"),
    ("not_utf8", "line 1: not UTF-8 text \\(byte 2: b'\\\\xff'\\)")])
def test_every_annotation_file_fault_is_named(tmp_path, kind, fault, message):
    path = str(tmp_path / ("ann.jsonl" if kind == "dolly" else "ann.json"))
    content = {"empty": b"  \n", "truncated": b'[{"a": "b', "not_utf8": b'[{\xff": 1}]'}.get(fault)
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(data.DataError, match=f"^{path}.*{message}"):
        data.read(kind, path, str(tmp_path))


@pytest.mark.parametrize("content", [None, b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"<html>not a picture</html>"])
def test_every_picture_fault_is_named(tmp_path, content):
    path = str(tmp_path / "p.png")
    if content is not None:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(data.DataError, match=f"unreadable picture {path}: "):
        conversation.load_image(path)


# ----------------------------------------------------------------------------------------------------------------
# Chat input

def test_bytes_that_are_not_utf8_do_not_end_the_chat(monkeypatch, capsys, tokenizer):
    raw = b"What colour \xff\xfe is it?\nfine\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="strict"))

    class Args:
        prompt, image = None, None

    lines = list(chat.rounds(Args))
    assert lines == ["What colour \ufffd\ufffd is it?", "fine"]
    assert capsys.readouterr().err.count("not UTF-8") == 1
    tokenizer.encode(lines[0])  # sentencepiece takes it
    # Lone surrogates, as a C-locale terminal or the command line hand over undecodable bytes, too.
    assert list(chat.valid_text(["a\udcff b", "c\ud800"])) == ["a\ufffd\ufffd\ufffd b", "c\ufffd\ufffd\ufffd"]


# ----------------------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at random moments, then --resume

def train_cmd(base, out, config, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--llama", base["llama"],
            "--openflamingo", base["openflamingo"], "--vision", base["vision"], "--vision-weights",
            base["vision_weights"], "--out", str(out), "--lr", "3e-3", "--warmup", "1", "--batch-size", "1",
            "--max-len", "64", "--workers", "0", "--lora-r", "4", "--grad-accum", "1", "--save-every", "1",
            "--max-steps", "8", *extra]


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(base, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"seed": 0, "demo": {"vl": 24, "lang": 12, "seed": 0}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(base, straight, str(config)), cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    ckpt = out / "ckpt.pt"
    for attempt in range(6):
        resume = ["--resume"] if ckpt.exists() else []
        proc = subprocess.Popen(train_cmd(base, out, str(config), *resume), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        deadline = time.time() + 120  # wait for this run to get going (a new checkpoint), then kill it soon after
        while proc.poll() is None and time.time() < deadline and \
                (not ckpt.exists() or ckpt.stat().st_mtime_ns == before):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        state = checkpoints.read_train_state(str(ckpt))  # loads: the new one or the previous one
        assert 1 <= state["step"] <= 8
        lines = open(out / "metrics.jsonl").read().split("\n")
        assert all(json.loads(line) for line in lines[:-1])  # whole lines (a torn last one is dropped on resume)
    else:
        subprocess.run(train_cmd(base, out, str(config), "--resume"), cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=300)
    assert kills >= 2
    a = torch.load(straight / "lora.pt", weights_only=True)["weights"]
    b = torch.load(out / "lora.pt", weights_only=True)["weights"]
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    records = [[json.loads(line) for line in open(d / "metrics.jsonl")] for d in (straight, out)]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]]
    assert [r["loss_vl"] for r in records[1]] == pytest.approx([r["loss_vl"] for r in records[0]], abs=1e-6)


def test_resume_from_a_malicious_ckpt_is_a_named_error_and_runs_no_code(base, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"world": 1, "x": Exploit(marker)}, out / "ckpt.pt")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"seed": 0, "demo": {"vl": 8, "lang": 4, "seed": 0}}))
    done = subprocess.run(train_cmd(base, out, str(config), "--resume"), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"error: {out / 'ckpt.pt'}: not a mmgpt training state (it holds objects other than tensors" \
        in done.stderr.splitlines()[-1]
    assert not marker.exists()


def test_data_check_with_a_broken_tokenizer_is_a_named_error(tmp_path):
    dolly = str(tmp_path / "dolly.jsonl")
    write_annotations("dolly", dolly, RECORDS["dolly"][0])
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"vl": [], "lang": [{"kind": "dolly", "ann": [dolly]}]}))
    (tmp_path / "tok.model").write_bytes(b"\x0a\x03abc")
    with pytest.raises(SystemExit, match=f"^{tmp_path / 'tok.model'}: not a sentencepiece model"):
        data.main([str(cfg), "--check", "--tokenizer", str(tmp_path / "tok.model")])
