"""Shared test fixtures: a sentencepiece model trained here (LLaMA's settings) and tiny model configs."""
import os
import random
import sys

import pytest
import sentencepiece as spm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmgpt  # noqa: E402

WORDS = ("the a cat dog sat on mat red blue green yellow square circle triangle picture shows two three four "
         "what colour is shape how many left right top bottom there are answer response instruction image below "
         "describes task write that appropriately completes request ### : . , ? ! 0 1 2 3 4 5 6 7 8 9").split()


def train_sentencepiece(prefix: str, vocab_size: int = 400) -> str:
    """A BPE model with LLaMA's tokenizer settings (byte fallback, split digits, identity normalisation, extra
    whitespace kept, dummy prefix; unk 0, bos 1, eos 2). Trains in well under a second."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(2000)]
    lines += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.", "### Image:", "### Instruction:", "### Response:", "### Input:"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(str(tmp_path_factory.mktemp("sp") / "sp"))


@pytest.fixture(scope="session")
def tokenizer(sp_model) -> mmgpt.Tokenizer:
    return mmgpt.Tokenizer(sp_model)


TINY_VISION = mmgpt.PRESETS["tiny"]["vision"]


def tiny_config(tokenizer, **overrides) -> mmgpt.Config:
    return mmgpt.config("tiny", **{"vocab_size": tokenizer.vocab_size, "image_id": tokenizer.image_id, **overrides})


def tiny_model(tokenizer, seed: int = 0, gates: tuple = (0.7, -0.5), **overrides) -> mmgpt.MMGPT:
    """A random tiny model in eval mode; gates nonzero so that the pictures matter."""
    torch.manual_seed(seed)
    model = mmgpt.build(tiny_config(tokenizer, **overrides)).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.xattn is not None:
                layer.xattn.attn_gate.fill_(gates[0])
                layer.xattn.ff_gate.fill_(gates[1])
    return model


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine they cost seconds per forward. A module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it); run them with `pytest -m gpu tests`")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
