"""The fused projections (q/k/v, gate/up), LoRA on them, the labelled-positions loss and LoRA in bf16.

The reference here is the unfused LLaMA computed from the split tensors the files hold (q_proj, k_proj, v_proj,
gate_proj, up_proj, each with its own LoRA), so the fused model is held against what HF/peft compute."""
import collections
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import lora
import mmgpt
from conftest import tiny_model
from perceiver import make_picture_mask

SUBSET = ("q_proj", "v_proj", "to_kv", "ff.3")  # k_proj and o_proj left out: un-adapted rows of a fused layer


def inputs(tokenizer, n_rows=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, tokenizer.image_id - 1, (n_rows, 24), generator=g)
    ids[:, 2] = tokenizer.image_id
    ids[:, 12] = tokenizer.image_id
    images = torch.randn(n_rows, 2, 3, 28, 28, generator=g)
    return images, ids


def with_lora(tokenizer, targets, seed=0, **kw):
    model = tiny_model(tokenizer, seed=seed, **kw)
    torch.manual_seed(seed + 1)
    lora.inject(model, r=4, alpha=8, targets=targets, within="layers.")
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.3)
    return model


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_logits(model, t, images, ids):
    """The language model from the split tensors `t` (file names): separate q/k/v and gate/up matmuls, each with
    its own LoRA when `t` holds one; the cross-attention blocks are the model's own (they are not fused)."""
    cfg = model.cfg

    def linear(x, name):
        y = x @ t[f"{name}.weight"].T
        if f"{name}.lora_A" in t:
            y = y + (x @ t[f"{name}.lora_A"].T @ t[f"{name}.lora_B"].T) * 2.0  # alpha / r = 8 / 4
        return y

    kv = model.picture_kv(model.encode_images(images))
    index = mmgpt.media_index(ids, cfg.image_id, cfg.attend_previous)
    B, T = ids.shape
    # HF's rotary embedding, written out: rotate_half(x) = (-x2, x1)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(T).float(), inv_freq).repeat(1, 2)

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()

    mask = make_picture_mask(index, cfg.perceiver_latents, kv[cfg.xattn_layers[0]][0].shape[2], torch.float32)
    x = model.embed_tokens(ids)
    for i, layer in enumerate(model.layers):
        if layer.xattn is not None:
            x = layer.xattn(x, kv[i], mask)
        p = f"layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"], cfg.norm_eps)
        q, k, v = (linear(h, p + f"self_attn.{n}").view(B, T, cfg.n_heads, -1).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        x = x + linear(y, p + "self_attn.o_proj")
        h = rms(x, t[p + "post_attention_layernorm.weight"], cfg.norm_eps)
        x = x + linear(F.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return rms(x, t["norm.weight"], cfg.norm_eps) @ t["lm_head.weight"].T


def grads_by_file_name(model, within=""):
    """Each LoRA tensor's gradient under its file name, sliced as lora.file_layout slices the parameter."""
    params = dict(model.named_parameters())
    out = {}
    for pname, views in lora.file_layout(model).items():
        p = params[pname]
        for n, v in views.items():
            if ".lora_" in n and within in n:
                out[n] = p.grad.as_strided(v.shape, v.stride(), v.storage_offset() - p.storage_offset())
    return out


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, SUBSET])
def test_fused_equals_split_reference(tokenizer, targets):
    model = with_lora(tokenizer, targets)
    lora.mark_trainable(model)
    images, ids = inputs(tokenizer)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 8, -100)
    # The reference's own leaf copies of the split tensors (the xattn LoRA stays the model's: it is not fused).
    t = {n: v.detach().clone().requires_grad_(".lora_" in n) for n, v in lora.file_tensors(model).items()
         if ".xattn." not in n}
    assert "layers.0.self_attn.q_proj.lora_A" in t and "layers.0.mlp.gate_proj.weight" in t
    assert ("layers.0.self_attn.k_proj.lora_A" in t) == (targets == lora.DEFAULT_TARGETS)
    ref = reference_logits(model, t, images, ids)
    ref_loss = mmgpt.lm_loss(ref, labels)
    ref_loss.backward()
    ref_grads = {n: v.grad for n, v in t.items() if v.requires_grad}
    ref_grads.update({n: g.clone() for n, g in grads_by_file_name(model, ".xattn.").items()})
    model.zero_grad()

    torch.testing.assert_close(model(images, ids), ref, rtol=1e-5, atol=1e-5)
    loss = model.loss(images, ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    got = grads_by_file_name(model)
    assert set(got) == set(ref_grads) and len(got) > 0
    for n in got:
        torch.testing.assert_close(got[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)
    # The blocks of a fused lora_B outside its parts get no gradient: the optimizer never moves them.
    for m in lora.lora_layers(model):
        if m.mask is not None:
            assert (m.lora_B.grad * (1 - m.mask)).abs().max() == 0


def test_merge_leaves_unadapted_parts_bit_identical(tokenizer):
    model = with_lora(tokenizer, SUBSET)
    images, ids = inputs(tokenizer)
    unmerged = model(images, ids)
    # Unmerged, too, the rows of k (not adapted) are exactly the frozen projection's.
    qkv, x = model.layers[0].self_attn.qkv_proj, torch.randn(2, 5, 64)
    assert torch.equal(qkv(x)[..., 64:128], F.linear(x, lora.file_tensors(model)["layers.0.self_attn.k_proj.weight"]))
    assert not torch.equal(qkv(x)[..., :64], F.linear(x, qkv.weight[:64]))
    before = {n: t.clone() for n, t in lora.file_tensors(model).items() if n.endswith(".weight")}
    lora.merge(model)
    torch.testing.assert_close(model(images, ids), unmerged, rtol=1e-4, atol=1e-4)
    after = lora.file_tensors(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {f"layers.{i}.{s}.weight" for i in range(4) for s in ("self_attn.q_proj", "self_attn.v_proj")} \
        | {f"layers.{i}.xattn.{s}.weight" for i in (1, 3) for s in ("attn.to_kv", "ff.3")}
    lora.unmerge(model)
    torch.testing.assert_close(model(images, ids), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, SUBSET])
def test_save_lora_and_read_back(tokenizer, tmp_path, targets):
    model = with_lora(tokenizer, targets)
    images, ids = inputs(tokenizer)
    settings = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_targets": lora.targets_of(model)}
    checkpoints.save_lora(model, str(tmp_path / "lora.pt"), settings)
    saved = torch.load(tmp_path / "lora.pt", weights_only=True)["weights"]
    assert set(saved) == set(lora.lora_state_dict(model)) and not any("qkv_proj" in n for n in saved)
    assert ("layers.2.self_attn.k_proj.lora_B" in saved) == (targets == lora.DEFAULT_TARGETS)
    assert saved["layers.2.self_attn.v_proj.lora_A"].shape == (4, 64)
    fresh = tiny_model(tokenizer)  # same seed: the same frozen weights, no LoRA yet
    checkpoints.apply_lora(fresh, checkpoints.read_lora(str(tmp_path / "lora.pt")), "lora.pt", dtype=torch.float32)
    assert lora.adapted_names(fresh) == lora.adapted_names(model)
    torch.testing.assert_close(fresh(images, ids), model(images, ids), rtol=1e-6, atol=1e-6)


def test_save_llama_writes_split_names_and_loads_back_bit_identical(tokenizer, sp_model, tmp_path):
    from safetensors.torch import load_file
    model = tiny_model(tokenizer)
    checkpoints.save_llama(model, str(tmp_path / "llama"), sp_model)
    keys = set(load_file(str(tmp_path / "llama" / "model.safetensors")))
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight", "model.layers.3.mlp.gate_proj.weight",
            "model.layers.3.mlp.up_proj.weight"} <= keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    with open(tmp_path / "vision.json", "w") as f:
        json.dump(model.cfg.vision, f)
    loaded, _, _ = checkpoints.load(llama=str(tmp_path / "llama"), vision=str(tmp_path / "vision.json"),
                                    vision_weights=None)
    params = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        if checkpoints.is_llama_param(n):
            assert torch.equal(params[n], p), n


def test_loss_equals_lm_loss_with_padding_and_a_row_without_labels(tokenizer):
    model = with_lora(tokenizer, lora.DEFAULT_TARGETS)
    trainable = [p for n, p in model.named_parameters() if n in lora.mark_trainable(model)]
    images, ids = inputs(tokenizer, n_rows=3)
    mask = torch.ones_like(ids)
    mask[0, 18:] = 0                                         # right padding, not labelled
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100                                     # the prompt
    labels[2] = -100                                         # a row with nothing to learn: it adds nothing
    results = []
    for loss_fn in (lambda: mmgpt.lm_loss(model(images, ids, mask), labels),
                    lambda: model.loss(images, ids, labels)):  # right padding needs no mask: see loss()
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainable]))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    # The mean runs over the labelled positions of the other rows only ...
    both = model.loss(images[:2], ids[:2], labels[:2])
    torch.testing.assert_close(both, b, rtol=1e-6, atol=1e-6)
    # ... and a batch with no labels at all gives NaN, as lm_loss does.
    none = torch.full_like(ids, -100)
    assert model.loss(images, ids, none).isnan() and mmgpt.lm_loss(model(images, ids, mask), none).isnan()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("targets", [("o_proj",), ("q_proj", "v_proj")])  # a plain layer; a fused one, k left out
def test_bf16_lora_runs_without_casts_and_matches_fp32(tokenizer, targets):
    model = with_lora(tokenizer, targets)
    layer = lora.lora_layers(model)[0]
    x = torch.randn(2, 5, 64)
    want = layer(x)
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == layer.weight.dtype == torch.bfloat16
    x = x.bfloat16()
    with CountOps() as count, torch.no_grad():
        got = layer(x)
    assert count.ops["_to_copy"] == count.ops["copy_"] == 0, count.ops
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # The whole bf16 model: LoRA adds no cast to the ones the model makes anyway (RMSNorm's fp32 statistics).
    images, ids = inputs(tokenizer)

    images = images.bfloat16()

    def casts(m):
        with CountOps() as count, torch.no_grad():
            m(images, ids)
        return count.ops["_to_copy"] + count.ops["copy_"]

    plain = tiny_model(tokenizer).to(torch.bfloat16)
    adapted = tiny_model(tokenizer).to(torch.bfloat16)
    lora.inject(adapted, r=4, alpha=8, targets=lora.DEFAULT_TARGETS, within="layers.")
    assert {p.dtype for p in adapted.parameters()} == {torch.bfloat16}
    assert casts(adapted) == casts(plain)


def test_targets_of_rebuilds_the_same_layers_and_mark_trainable(tokenizer):
    model = with_lora(tokenizer, SUBSET)
    assert lora.targets_of(model) == ["self_attn.q_proj", "self_attn.v_proj", "xattn.attn.to_kv", "xattn.ff.3"]
    again = tiny_model(tokenizer)
    assert lora.inject(again, targets=lora.targets_of(model), within="layers.") == lora.adapted_names(model)
    names = lora.mark_trainable(model, extra=("perceiver.norm.weight",))
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert "perceiver.norm.weight" in names and all(n.endswith(("lora_A", "lora_B")) for n in names[1:]) \
        and len(names) == 1 + 2 * (4 * 1 + 2 * 2)  # one fused q/k/v LoRA per layer; to_kv, ff.3 per block


def test_presets(tokenizer):
    cfg = mmgpt.config("bench-tiny")
    assert cfg.n_layers == 32 and cfg.xattn_layers == tuple(range(3, 32, 4)) and cfg.dim == 128
    assert mmgpt.config("7b") == mmgpt.Config()
    tiny = mmgpt.config("tiny", vocab_size=tokenizer.vocab_size, image_id=tokenizer.image_id, n_layers=2)
    assert tiny.n_layers == 2 and tiny.dim == 64 and mmgpt.PRESETS["tiny"]["vision"] is not tiny.vision
    with pytest.raises(ValueError, match=r"unknown preset 'huge'; known: 7b, demo, tiny, bench-tiny"):
        mmgpt.config("huge")


def test_decoder_layer_traces_as_one_graph(tokenizer):
    """No host sync or Python branch on tensor values inside a layer: dynamo captures it whole (fullgraph), so
    one compiled layer can serve all of them. backend="eager": the capture is what is tested, in well under a
    second."""
    model = with_lora(tokenizer, SUBSET)
    model.train()
    lora.mark_trainable(model)
    images, ids = inputs(tokenizer)
    kv = model.picture_kv(model.encode_images(images))
    mask = make_picture_mask(mmgpt.media_index(ids, tokenizer.image_id), model.cfg.perceiver_latents,
                             kv[1][0].shape[2], torch.float32)
    x = model.embed_tokens(ids).flatten(0, 1)
    T = ids.shape[1]
    cos, sin = (t[None, :T] for t in (model.rope_cos, model.rope_sin))
    layer = model.layers[1]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    want = layer(x, cos, sin, None, (kv[1], mask, None))
    got = compiled(x, cos, sin, None, (kv[1], mask, None))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
