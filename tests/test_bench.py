"""bench.py --tiny: the training and chat rows on a CPU, their figures consistent, and its op count the real one;
bench.py --serve: serve.py's server under streaming clients, its rows; the answers its clients get, checked here."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bench
import chat
import demo
import lora
import mmgpt
import options
import quantize
import serve
import train
from conftest import tiny_release
from engine import Engine, Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--tiny", "--train-only", "--layouts", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = result["train"]
    assert [(r["seq"], r["layout"], r["checkpointing"], r["fast"]) for r in rows] == \
        [(64, "1+1", False, False), (64, "1+1", True, False)]
    for r in rows:
        assert r["tokens_per_s"] * r["seconds"] == pytest.approx(2 * 64, rel=1e-12)
        assert abs(r["mfu"] - r["tflops"] / result["matmul_tflops"]) < 1e-12
        assert r["warmup_s"] > 0 and r["kernels"] is None and r["gpu_busy"] is None and r["peak_gib"] is None
    # The same work with and without checkpointing (recomputation is not counted as useful FLOPs).
    assert rows[0]["tflops"] * rows[0]["seconds"] == pytest.approx(rows[1]["tflops"] * rows[1]["seconds"], rel=1e-9)
    assert result["trainable"] < result["params"] / 5 and result["chat"] == []

    # The op count is what one train.py iteration (train_iteration + optimizer_step) on that model dispatches.
    torch.manual_seed(0)
    model = mmgpt.build(mmgpt.config("bench-tiny"))
    assert model.cfg.n_layers == 32
    lora.inject(model, r=16, alpha=16, within="layers.")
    named = {n: model.get_parameter(n) for n in lora.mark_trainable(model)}
    assert sum(p.numel() for p in named.values()) == result["trainable"]
    optimizer = train.MasterAdamW([{"params": named}], lr=1e-5, copies=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batches = bench.batches(model.cfg, 1, 64)
    for counting in (False, True):  # the first step makes AdamW's state: count the second
        with bench.OpCounter() if counting else bench.nullcontext() as count:
            train.train_iteration(train.WithLoss(model.train()), batches, "cpu")
            train.optimizer_step(optimizer, scheduler)
    assert rows[0]["aten_ops"] == count.ops > 1000
    assert rows[1]["aten_ops"] is None
    assert f"aten ops per training iteration (1+1 x 64, 32 layers): {count.ops:,}" in done.stdout


def test_bench_tiny_chat(tmp_path):
    """The chat rows (chat.py's path: eager, then --int8), the engine rows and the op counts run on the CPU, as
    they will on a GPU (where the fast rows are added), with consistent figures."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--tiny", "--chat-only", "--concurrency", "1,2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["train"] == [] and result["copy_bandwidth_gb_s"] is None
    rows = result["chat"]
    assert [(r["fast"], r["int8"]) for r in rows] == [(False, False), (False, True)]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["second_round_first_token_ms"] > 0
        assert r["bandwidth_fraction"] is None and r["peak_gib"] is None and "warmup_s" not in r
    # fp32 weights (LoRA merged, as the programs load a model), then int8 ones (a byte per weight, a scale per row,
    # the norms in fp32): about a quarter
    assert 0.2 < rows[1]["weights_gb_per_token"] / rows[0]["weights_gb_per_token"] < 0.3
    assert [(r["concurrency"], r["fast"]) for r in result["engine"]] == [(1, False), (2, False)]
    for r in result["engine"]:
        assert r["decode_tokens_per_s"] == pytest.approx(r["concurrency"] * r["per_request_tokens_per_s"])
    ops = result["ops_per_token"]
    assert 1000 < ops["merged"] < ops["unmerged"]
    assert f"aten ops per decoded token at batch 1 (eager): {ops['unmerged']:,.0f} with LoRA unmerged, " \
           f"{ops['merged']:,.0f} merged" in done.stdout


def test_ops_per_token_is_what_a_decode_step_dispatches():
    """bench.ops_per_token counts the aten ops of engine steps that decode one token each: the same count as a
    step counted by hand, and merging LoRA removes its ops."""
    torch.manual_seed(0)
    model = mmgpt.build(mmgpt.config("bench-tiny", n_layers=4, xattn_layers=(1, 3))).eval()
    lora.inject(model, r=4, alpha=4, within="layers.")
    engine = Engine(model, bench.Tokenizer(), slots=1)
    (r,) = [engine.submit(r) for r in bench.requests(model.cfg, "cpu", 1, 20, 8, torch.float32)]
    engine.step()
    with bench.OpCounter() as counter:
        engine.step()
    assert len(r.tokens) == 2 and bench.ops_per_token(model, "cpu", steps=3) == counter.ops
    unmerged = counter.ops
    lora.merge(model)
    assert bench.ops_per_token(model, "cpu", steps=3) < unmerged


def test_decode_bytes_count_the_weights_a_token_reads():
    """The decoder's weights and lm_head as held (not the embeddings, ViT, perceiver or KV cache): fp32 4 bytes
    per weight; LoRA's factors while unmerged (merged, the weight holds them); after quantize.quantize 1 byte per
    linear weight + a scale per row + the norms and gates."""
    torch.manual_seed(0)
    model = mmgpt.build(mmgpt.config("bench-tiny", n_layers=2))
    decoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("layers.", "norm.", "lm_head.")))
    assert bench.decode_bytes(model) == 4 * decoder
    lora.inject(model, r=4, alpha=4, within="layers.")
    factors = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert factors > 0 and bench.decode_bytes(model) == 4 * (decoder + factors)
    lora.merge(model)
    assert bench.decode_bytes(model) == 4 * decoder
    if quantize.fbgemm_fp16():     # fbgemm's packed fp16 layers, which are no tensor of the model: 2 bytes a weight
        assert bench.decode_bytes(quantize.quantize(copy.deepcopy(model).half(), "fp16")) == 2 * decoder
    quantize.quantize(model)
    int8 = bench.decode_bytes(model)
    assert decoder < int8 < 1.1 * decoder


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, sp_model, tokenizer):
    """A train.py run of a tiny model (its answers never end before max_tokens) with two pictures in samples/."""
    files = tiny_release(tmp_path_factory.mktemp("bench-serve"), sp_model, tokenizer, never_ends=True)
    os.makedirs(os.path.join(files["run"], "samples"))
    for i, name in enumerate(("pic1", "pic2")):
        shutil.copy(files[name], os.path.join(files["run"], "samples", f"{i}.png"))
    return files["run"]


def serve_bench(run, concurrencies):
    threads, results = torch.get_num_threads(), {"serve": []}
    try:
        bench.bench_serving(run, torch.device("cpu"), concurrencies, results, new_tokens=6)
    finally:
        torch.set_num_threads(threads)
    return results


def test_bench_serve_rows(served_run, capsys):
    """The rows of `bench.py --serve` (chat.py's way, then the server at each concurrency, then with logprobs and
    with n = 1 and 4) count every answer and token; the costs and the re-sent rounds' times are there."""
    results = serve_bench(served_run, [1, 3])
    rows = results["serve"]
    assert [(r["clients"], r["answers"]) for r in rows] == [("chat.py", 8), ("1", 8), ("3", 6), ("3, logprobs", 6),
                                                            ("1, n=1", 8), ("1, n=4", 8)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_ms"][0] <= r["ttft_ms"][1] and 0 < r["itl_ms"][0] <= r["itl_ms"][1]
    assert set(results["resend_ttft_ms"]) == {"first round", "sent again", "sent again, cold"}
    assert results["logprobs"]["off"] == rows[2]["tokens_per_s"] and set(results["n"]) == {1, 4}
    out = capsys.readouterr().out
    assert "logprobs with the top 5:" in out and "x the time of n = 1 per request" in out


def test_the_answers_bench_serve_times_are_chat_pys_and_a_cold_servers(served_run):
    """The answers bench.py --serve times, got by its own clients (bench.wave, bench.resend): each streamed answer,
    3 clients at once, is chat.py's for the same picture and question (greedy); each conversation sent again with one
    more turn gets the answer a server that has cached nothing gives."""
    flags = bench.argparse.ArgumentParser()
    options.add_weight_args(flags)
    model, tokenizer, transform, _ = options.load_model(flags.parse_args(["--ckpt", served_run]), "cpu")
    pictures = sorted(os.path.join(served_run, "samples", f) for f in os.listdir(os.path.join(served_run, "samples")))
    questions = [q for qs in demo.QUESTIONS.values() for q in qs]
    no_end = dict(eos_id=-1, banned=[*tokenizer.never_generate, tokenizer.eos_id])
    body = lambda i: bench.serving_body(i, pictures, questions, 6)

    def chat_py(i: int) -> str:
        picture, question = bench.serving_case(i, pictures, questions)
        c = chat.Chat(Engine(model, tokenizer, **no_end), transform, 6, Sampling(greedy=True))
        c.add_picture(pictures[picture])
        c.ask(questions[question])
        return c.parts[-1].turns[-1].answer

    def on_a_server(options, job, *args):
        server = serve.start(Engine(model, tokenizer, slots=3, **options), transform, quiet=True)
        try:
            return job(server.server_address[1], *args)
        finally:
            serve.stop(server, grace=0)

    answers, _ = on_a_server(no_end, bench.wave, [[body(2 * k + j) for j in range(2)] for k in range(3)])
    assert [a["text"] for x in answers for a in x] == [chat_py(i) for i in range(6)]
    rounds = on_a_server({}, bench.resend, [body(100 + i) for i in range(3)], questions[:3])
    for one, two, again in rounds:
        ((cold,),), _ = on_a_server({}, bench.wave, [[again]])
        assert two["text"] == cold["text"] and two["tokens"] == cold["tokens"]
