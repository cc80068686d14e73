"""bench.py --tiny runs the full benchmark code path on a CPU (compile variants are for the GPU run)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--tiny", "--no-compile", "--layouts", "1,2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [(r["layout"], r["checkpointing"]) for r in result["train"]] == \
        [("1+1", False), ("1+1", True), ("2+2", False), ("2+2", True)]
    for r in result["train"]:
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["seconds"] > 0
    chat = result["chat"][0]
    assert chat["prefill_ms"] > 0 and chat["decode_tokens_per_s"] > 0 and chat["weights_gb_per_token"] > 0
    assert result["trainable"] < result["params"] / 5
    assert "decode tok/s" in done.stdout and "MFU" in done.stdout
