"""Loaders: files written here in the documented layouts (HF LLaMA, OpenFlamingo checkpoint.pt, the MultiModal-GPT
LoRA release) load back into the same numbers; bad files give one clear error naming the file and the keys."""
import json
import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

import checkpoints
import lora
from conftest import TINY_VISION, tiny_model, write_release, write_vision
from fake_release import fake_mmengine


def hf_tensors(model):
    """The language model under HF names as LLaMA-7B's files have it: V embedding and lm_head rows (no added
    tokens), and the rotary buffers 2023 checkpoints carry."""
    sd = {checkpoints._hf_name(n): p.detach().clone() for n, p in lora.file_tensors(model).items()
          if checkpoints.is_llama_param(n)}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = sd[k][:-3]
    for i in range(model.cfg.n_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.cfg.head_dim // 2)
    return sd


def write_llama(model, directory, sp_model, fmt="safetensors", shards=1):
    checkpoints.save_llama(model, directory, sp_model)
    os.remove(os.path.join(directory, "model.safetensors"))
    sd = hf_tensors(model)
    names = sorted(sd)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for s in range(shards):
        part = {k: sd[k].contiguous() for k in names[s::shards]}
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        if fmt == "safetensors":
            save_file(part, os.path.join(directory, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(directory, fname))
        weight_map.update({k: fname for k in part})
    if shards > 1:
        with open(os.path.join(directory, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model, tokenizer):
    """A tiny model with LoRA, and its files in every layout."""
    tmp = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(tokenizer, seed=3)
    with torch.no_grad():  # no checkpoint holds the added tokens' lm_head rows: they load as zeros
        model.lm_head.weight[-3:] = 0
    lora.inject(model, r=4, alpha=8, within="layers.")
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.3)
    out = {"model": model, "tmp": tmp}
    for name, fmt, shards in [("st", "safetensors", 1), ("bin", "bin", 1), ("st2", "safetensors", 2),
                              ("bin3", "bin", 3)]:
        write_llama(model, tmp / name, sp_model, fmt, shards)
        out[name] = str(tmp / name)
    out["vision"], out["vision_weights"] = write_vision(model, tmp)
    out["openflamingo"] = str(tmp / "checkpoint.pt")
    checkpoints.save_openflamingo(model, out["openflamingo"])
    out["release"] = str(tmp / "mmgpt-lora-release.pt")
    write_release(model, out["release"], r=4, alpha=8)
    return out


def inputs(tokenizer):
    torch.manual_seed(5)
    ids = tokenizer.encode("Below is a picture.\n\n### Image:\n<image>\n\n### Instruction:\nwhat is <image> red?")
    return torch.randn(1, 2, 3, 28, 28), torch.tensor([ids])


@pytest.mark.parametrize("llama", ["st", "bin", "st2", "bin3"])
def test_release_layouts_round_trip(files, tokenizer, llama):
    model, tok, transform = checkpoints.load(llama=files[llama], openflamingo=files["openflamingo"],
                                            lora=files["release"], vision=files["vision"],
                                            vision_weights=files["vision_weights"])
    images, ids = inputs(tokenizer)
    assert tok.encode("a <image> b") == tokenizer.encode("a <image> b")
    torch.testing.assert_close(model(images, ids), files["model"](images, ids), rtol=1e-5, atol=1e-5)
    # The layout was read off the keys.
    assert model.cfg.xattn_layers == (1, 3) and model.cfg.perceiver_depth == 2 and model.cfg.perceiver_latents == 4
    assert {m.r for m in lora.lora_layers(model)} == {4} and {m.scale for m in lora.lora_layers(model)} == {2.0}
    assert not any(p.requires_grad for p in model.parameters())


def test_without_lora_and_without_openflamingo(files, tokenizer):
    source = dict(files["model"].named_parameters())
    model, _, _ = checkpoints.load(llama=files["st"], openflamingo=files["openflamingo"], vision=files["vision"],
                                  vision_weights=files["vision_weights"])
    for n, p in model.named_parameters():  # every weight, and no LoRA
        torch.testing.assert_close(p, source[n], msg=n)
    assert not lora.lora_layers(model)
    plain, _, _ = checkpoints.load(llama=files["st"], vision=files["vision"], vision_weights=files["vision_weights"])
    assert plain.cfg.xattn_layers == (3,)  # default placement for 4 layers: before layer 3
    assert all(float(layer.xattn.attn_gate) == 0 for layer in plain.layers if layer.xattn is not None)
    assert (plain.lm_head.weight[-3:] == 0).all()


def test_own_lora_file_round_trip(files, tokenizer, tmp_path):
    model = files["model"]
    settings = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_targets": list(lora.DEFAULT_TARGETS),
                "llama": files["st"], "openflamingo": files["openflamingo"], "vision": files["vision"],
                "vision_weights": files["vision_weights"]}
    checkpoints.save_lora(model, str(tmp_path / "lora.pt"), settings)
    loaded, _, _ = checkpoints.load_run(str(tmp_path))
    images, ids = inputs(tokenizer)
    torch.testing.assert_close(loaded(images, ids), model(images, ids), rtol=1e-5, atol=1e-5)
    # It is a plain file: weights_only loading reads it.
    assert torch.load(tmp_path / "lora.pt", weights_only=True)["format"] == "mmgpt-lora"


def test_frozen_weights_are_held_in_the_requested_dtype(files):
    model, _, _ = checkpoints.load(llama=files["st"], openflamingo=files["openflamingo"], lora=files["release"],
                                  vision=files["vision"], vision_weights=files["vision_weights"], dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".lora_" not in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)


def test_vision_features_skip_ln_post(files):
    """open_clip 3's output_tokens applies ln_post; the perceiver was trained on tokens without it."""
    model = files["model"]
    visual = model.vision.visual
    pixels = torch.randn(2, 3, 28, 28)
    ours = model.vision(pixels)
    visual.output_tokens = True
    try:
        _, open_clip_tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    assert ours.shape == (2, 4, 64)
    torch.testing.assert_close(visual.ln_post(ours), open_clip_tokens)
    assert (ours - open_clip_tokens).abs().max() > 0.1


def test_visual_only_weights_and_pixels(files, tmp_path):
    cfg, weights = write_vision(files["model"], tmp_path, full_clip=False)
    model, _, transform = checkpoints.load(llama=files["st"], vision=cfg, vision_weights=weights)
    torch.testing.assert_close(model.vision.visual.conv1.weight, files["model"].vision.visual.conv1.weight)
    from PIL import Image
    pixels = transform(Image.new("RGB", (40, 30), (255, 0, 0)))
    assert pixels.shape == (3, 28, 28)
    mean, std = 0.48145466, 0.26862954  # open_clip's OpenAI normalisation, red channel
    torch.testing.assert_close(pixels[0], torch.full((28, 28), (1 - mean) / std))


# -- bad files: one clear error naming the file and the keys ------------------------------------------------------

def copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_wrong_shape_unknown_and_missing_keys(files, tmp_path):
    path = copy_dir(files["st"], tmp_path / "llama")
    st = os.path.join(path, "model.safetensors")
    from safetensors.torch import load_file
    sd = load_file(st)
    sd["model.norm.weight"] = torch.ones(7)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, st)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(llama=path, vision=files["vision"], vision_weights=None)
    msg = str(e.value)
    assert st in msg and "norm.weight (7,)" in msg and "layers.0.self_attn.q_proj.bias" in msg
    # the missing key is reported once every shard was read
    sd["model.norm.weight"] = torch.ones(64)
    del sd["model.layers.0.self_attn.q_proj.bias"]
    save_file(sd, st)
    with pytest.raises(checkpoints.CheckpointError, match=r"llama: missing keys: model\.layers\.2\.mlp\.up_proj\.weight"):
        checkpoints.load(llama=path, vision=files["vision"], vision_weights=None)


def test_openflamingo_bad_keys(files, tmp_path):
    sd = torch.load(files["openflamingo"], weights_only=True)
    sd["perceiver.layers.0.0.to_q.weight"] = torch.zeros(3, 3)
    sd["lang_encoder.something_else.weight"] = torch.zeros(1)
    bad = str(tmp_path / "checkpoint.pt")
    torch.save(sd, bad)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.load(llama=files["st"], openflamingo=bad, vision=files["vision"], vision_weights=None)
    assert bad in str(e.value) and "something_else.weight" in str(e.value) \
        and "perceiver.layers.0.0.to_q.weight (3, 3)" in str(e.value)


def test_release_with_missing_lora_tensors(files, tmp_path):
    with fake_mmengine():
        ckpt = torch.load(files["release"], weights_only=False)
    sd = ckpt["model_state_dict"]
    for k in [k for k in sd if "layers.1.decoder_layer.self_attn.v_proj.lora_B" in k]:
        del sd[k]
    bad = str(tmp_path / "release.pt")
    torch.save({"model_state_dict": sd}, bad)  # no tuning_config: alpha defaults to 16
    with pytest.raises(checkpoints.CheckpointError, match=r"missing keys: layers\.1\.self_attn\.v_proj\.lora_B"):
        checkpoints.load(llama=files["st"], openflamingo=files["openflamingo"], lora=bad, vision=files["vision"],
                        vision_weights=None)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_nothing_arbitrary_is_unpickled(tmp_path, files):
    bad = str(tmp_path / "evil.pt")
    torch.save({"model_state_dict": {}, "tuning_config": Exploit()}, bad)
    with pytest.raises(checkpoints.CheckpointError, match=r"evil\.pt: cannot be read safely: refusing to unpickle"):
        checkpoints.read_checkpoint(bad)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.read_checkpoint(str(tmp_path / "plain.pkl"))


def test_release_config_is_read_without_mmengine(files):
    weights = checkpoints.read_lora(files["release"])
    assert (weights.r, weights.alpha, weights.dropout) == (4, 8.0, 0.0)
    assert weights.targets == lora.DEFAULT_TARGETS
    assert "mmengine" not in sys.modules


def test_missing_files_are_named(files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        checkpoints.load(llama=str(empty), vision=files["vision"], vision_weights=None)
    d = copy_dir(files["st"], tmp_path / "noweights")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="noweights: no LLaMA weights"):
        checkpoints.load(llama=d, vision=files["vision"], vision_weights=None)
    with pytest.raises(FileNotFoundError, match="nope.pt: no such file"):
        checkpoints.load(llama=files["st"], openflamingo=str(tmp_path / "nope.pt"), vision=files["vision"],
                        vision_weights=None)
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        checkpoints.load(llama=files["st"], vision="ViT-Nope", vision_weights=None)


def test_quick_gelu_follows_the_weights(tmp_path):
    """OpenFlamingo's ViT-L/14 is OpenAI's, which uses QuickGELU; open_clip's plain config does not say so."""
    local = tmp_path / "ViT-L-14.bin"
    torch.save({}, local)
    assert checkpoints.vision_model_config("ViT-L-14", "openai")["quick_gelu"]
    assert checkpoints.vision_model_config("ViT-L-14", str(local))["quick_gelu"]      # a local copy of OpenAI's
    assert not checkpoints.vision_model_config("ViT-L-14", None)["quick_gelu"]
    cfg = tmp_path / "no-quick.json"
    cfg.write_text(json.dumps(dict(TINY_VISION, quick_gelu=False)))
    assert not checkpoints.vision_model_config(str(cfg), str(local))["quick_gelu"]    # an explicit JSON key wins
    # OpenAI's own files are TorchScript archives: QuickGELU whatever the config says by default.
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    cfg.write_text(json.dumps({k: v for k, v in TINY_VISION.items() if k != "quick_gelu"}))
    assert checkpoints.vision_model_config(str(cfg), str(scripted))["quick_gelu"]
    assert not checkpoints.vision_model_config(str(cfg), str(local))["quick_gelu"]
