"""Training on several machines (issue 26), on this one over loopback: two torchrun "nodes" meeting by c10d
rendezvous, a worker SIGKILLed mid-run and its group restarted by torchrun --max-restarts to the weights of a run
that never stopped, a SIGTERM that reaches one rank, and rendezvous that cannot complete ending within their
timeouts with what to check."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

import train
from conftest import ROOT, assert_same, lora_weights, torchrun, train_base, train_command, train_env

# The uninterrupted run: 6 optimizer steps, a checkpoint every 2. A modest learning rate, because the 1-process
# run is compared with the 2-rank one to float rounding (see test_train.py).
SETTINGS = ("--grad-accum", "2", "--max-steps", "6", "--save-every", "2", "--lr", "3e-4")
LOOPBACK = dict(GLOO_SOCKET_IFNAME="lo")  # Gloo on 127.0.0.1, whatever the host name resolves to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(**LOOPBACK, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait(proc, timeout=300) -> str:
    """What the process wrote, once it has ended. On a timeout it is stopped first (torchrun stops its workers)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=60)
        raise


def finish(proc, timeout=300) -> str:
    out = wait(proc, timeout)
    assert proc.returncode == 0, out
    return out


def worker(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of that rank (its child whose environment says RANK=rank)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


def wait_for(path, proc):
    """Until the file exists and is not empty (while the run runs)."""
    deadline = time.time() + 300
    while not (path.exists() and path.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def optimizer_state(out) -> dict[str, torch.Tensor]:
    """ckpt.pt's AdamW state, flattened: {"<param index>.<exp_avg|exp_avg_sq|step>": tensor}."""
    state = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["optimizer"]["state"]
    return {f"{i}.{k}": t for i, s in state.items() for k, t in s.items()}


def records(out) -> list[dict]:
    """metrics.jsonl less the one field that is a timing."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_base(tmp_path_factory.mktemp("multinode"))


@pytest.fixture(scope="module")
def two_nodes(base):
    """The uninterrupted run: 2 nodes x 1 process, each node a torchrun that meets the other at a c10d endpoint,
    as on two machines (only the addresses are 127.0.0.1)."""
    out, endpoint = base["tmp"] / "two_nodes", f"127.0.0.1:{free_port()}"
    nodes = [start(train_command(base, out, *SETTINGS, launcher=torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "--rdzv-id", "test", "--local-addr", "127.0.0.1", "--rdzv-conf", f"is_host={int(node == 0)}")))
        for node in range(2)]
    logs = [finish(node) for node in nodes]
    assert any("effective batch 8 = 2 ranks x 1 x 2 accumulation" in log for log in logs)
    return out


def test_two_nodes_equal_one_process_accumulating_twice(base, two_nodes):
    one = base["tmp"] / "one"
    finish(start(train_command(base, one, *SETTINGS[2:], "--grad-accum", "4")))
    assert_same(lora_weights(one), lora_weights(two_nodes))
    # exp_avg agrees like the weights; exp_avg_sq holds squared gradients (down to ~1e-12), so it agrees
    # relatively; the step counts are equal.
    a, b = optimizer_state(one), optimizer_state(two_nodes)
    assert a.keys() == b.keys() and {k.split(".")[1] for k in a} == {"exp_avg", "exp_avg_sq", "step"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7 if k.endswith("exp_avg") else 1e-12, msg=k)


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_stopped(base, two_nodes):
    """torchrun --max-restarts 1 and --resume auto: the first attempt starts afresh, rank 1 is SIGKILLed after the
    first checkpoint, torchrun restarts the group, which resumes from the checkpoint to the uninterrupted run's
    weights, optimizer state and metrics (exactly: the same ranks do the same arithmetic)."""
    out = base["tmp"] / "restarted"
    proc = start(train_command(base, out, *SETTINGS, "--resume", "auto", launcher=torchrun(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1")), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    wait_for(out / "ckpt.pt", proc)
    os.kill(worker(proc.pid, rank=1), signal.SIGKILL)
    log = finish(proc)
    assert f"--resume auto: no {out / 'ckpt.pt'} yet, starting afresh" in log
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0].startswith("[rank 0/2] ")
    assert int(resumed[0].rsplit(" ", 1)[1]) in (2, 4)  # after a checkpoint, before the end
    a, b = lora_weights(two_nodes), lora_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = optimizer_state(two_nodes), optimizer_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]  # each step once
    assert records(out) == records(two_nodes)


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(base):
    """A scheduler's SIGTERM reaches the ranks at different moments; here only rank 1 gets one. Both stop after
    the same step and write the checkpoint together (rank 1 alone would wait in the checkpoint's collective while
    rank 0 waits in the next step's: a hang)."""
    out = base["tmp"] / "term"
    proc = start(train_command(base, out, "--grad-accum", "2", "--epochs", "10", launcher=torchrun(
        "--standalone", "--nproc-per-node", "2")))
    wait_for(out / "metrics.jsonl", proc)
    os.kill(worker(proc.pid, rank=1), signal.SIGTERM)
    log = finish(proc, timeout=120)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert f"[rank 0/2] SIGTERM: stopped at step {step}; {out / 'ckpt.pt'} written" in log
    assert [r["step"] for r in records(out)] == list(range(1, step + 1)) and step < 120


def test_restarts_without_a_fresh_store_per_round_are_refused(monkeypatch):
    """torchrun's shared store outlives a restart (pytorch#135712): the restarted group would read the dead one's
    addresses. train.py says what to export before it gets there."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with pytest.raises(SystemExit, match=r"^\[rank 1/2\] torchrun --max-restarts: export "
                                         r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"):
        train.setup(train.parse_args(["--device", "cpu"]))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rendezvous_that_cannot_complete_ends_within_its_timeout_saying_what_to_check(base, rank):
    """Rank 0 alone waits for a rank that never comes (a node missing); rank 1 alone finds nobody at MASTER_ADDR
    (a wrong address). Both give up after --rdzv-timeout, not torch's 30 minutes, and name what to check."""
    port, started = str(free_port()), time.time()
    proc = start(train_command(base, base["tmp"] / f"alone{rank}", "--rdzv-timeout", "2"), RANK=str(rank),
                 WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    log = wait(proc, timeout=120)
    assert proc.returncode == 1 and time.time() - started < 60
    lines = log.splitlines()[-4:]
    assert lines[0].startswith(f"[rank {rank}/2] the process group of 2 ranks did not form within --rdzv-timeout 2 s")
    assert [line.split(":")[0] for line in lines[1:]] == [f"[rank {rank}/2] check"] * 3
    assert f"MASTER_ADDR:MASTER_PORT (127.0.0.1:{port})" in lines[2]
    assert "NCCL_SOCKET_IFNAME" in lines[3] and "GLOO_SOCKET_IFNAME" in lines[3]


def test_a_missing_node_ends_torchruns_rendezvous_within_join_timeout(base):
    """The README's advice for torchrun's own rendezvous: --rdzv-conf join_timeout bounds the wait for nodes."""
    started = time.time()
    proc = start(train_command(base, base["tmp"] / "missing", launcher=torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1", "--rdzv-conf", "join_timeout=2")))
    log = wait(proc, timeout=120)
    assert proc.returncode == 1 and time.time() - started < 60
    assert "RendezvousTimeoutError" in log
    assert not (base["tmp"] / "missing").exists()  # train.py never started


def test_ranks_that_see_different_checkpoints_refuse_to_resume(base, two_nodes, tmp_path):
    """--out on a folder that each node has its own copy of (not shared, or an older copy): rank 1 finds no
    ckpt.pt where rank 0 finds one."""
    shared, own, port = tmp_path / "shared", tmp_path / "own", str(free_port())
    shutil.copytree(two_nodes, shared)
    procs = [start(train_command(base, out, *SETTINGS, "--resume", "auto"), RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank, out in enumerate((shared, own))]
    for rank, (proc, out) in enumerate(zip(procs, (shared, own))):
        log = wait(proc)
        assert proc.returncode == 1
        assert log.splitlines()[-1] == (f"[rank {rank}/2] --resume: the ranks found different checkpoints at "
                                        f"{out / 'ckpt.pt'} (step 6 on ranks 0; no file on ranks 1): --out must be "
                                        "one folder that every node sees (a shared filesystem)")
