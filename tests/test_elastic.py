"""torchrun for real (gloo on CPU): a killed rank under `--max-restarts` (the group restarts, resumes from last.pt and
ends identical to an uninterrupted run), the README's two-node command as two "nodes" on this machine, and the store
a restarted group meets (the dead group's keys still in torchrun's store).

Every torchrun gets a free port of its own for its c10d rendezvous; output goes to a file (not a pipe), as in
test_reliability.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from fakedata import write_cifar10_python
from test_reliability import BASE, assert_same_run, load

from cvt_train.engine import distributed

# 300 train / 100 test images, batch 50 per rank, 2 ranks: 3 steps per epoch, 3 epochs (about 0.5 s an epoch)
ARGS = [*BASE, "data.num_workers=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _key in ("HYDRA_FULL_ERROR", "CVT_DEBUG", "CVT_FAULT_INJECT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
    ENV.pop(_key, None)
TIMEOUT = 240  # a restarted group that hangs (the bug this file is about) would wait for the 60-minute timeout
CHECKSUMS = re.compile(r"weight checksums per rank: \[([^\]]*)\] \(identical\)")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=300, n_test=100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(torchrun_args: list[str], args: list[str], out: Path, cwd: Path) -> subprocess.Popen:
    """`torchrun TORCHRUN_ARGS -m cvt_train.train ARGS` in its own session, its output (all ranks) to OUT."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "cvt_train.train", *args]
    return subprocess.Popen(
        cmd, cwd=cwd, stdout=open(out, "a"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True
    )


def elastic(port: int) -> list[str]:
    """The README's single-node elastic command: two workers, two restarts, c10d rendezvous on a free port."""
    return ["--nproc_per_node=2", "--max-restarts=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]


def workers(agent: subprocess.Popen) -> dict[int, int]:
    """torchrun's live workers (its children; each in a session of its own): {pid: local rank}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent.pid:
                continue
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        found[int(entry.name)] = int(env.get(b"LOCAL_RANK", b"-1"))
    return found


def worker_pid(agent: subprocess.Popen, local_rank: int) -> int:
    pids = [pid for pid, rank in workers(agent).items() if rank == local_rank]
    assert len(pids) == 1, (
        f"torchrun {agent.pid}: workers {workers(agent)}, none (or several) of local rank {local_rank}"
    )
    return pids[0]


def stop(agent: subprocess.Popen) -> None:
    """Kill torchrun and its workers, if still running."""
    if agent.poll() is None:
        for pid in workers(agent):
            os.kill(pid, signal.SIGKILL)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()


def finish(agent: subprocess.Popen, out: Path) -> str:
    """Wait for torchrun to end (0, or the test fails); one that hangs is killed with its workers."""
    try:
        code = agent.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(agent)
        pytest.fail(f"torchrun still running after {TIMEOUT} s:\n{out.read_text()[-4000:]}")
    text = out.read_text()
    assert code == 0, text[-4000:]
    return text


@pytest.fixture
def launched():
    """The torchruns a test starts: whatever still runs when it ends (a failed assertion) is killed."""
    agents: list[subprocess.Popen] = []
    yield agents
    for agent in agents:
        stop(agent)


def wait_for(what: str, ready, agent: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert agent.poll() is None, f"torchrun ended before {what}:\n{out.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{out.read_text()[-4000:]}"
        time.sleep(0.02)


def stamp(path: Path) -> tuple[int, int] | None:
    """Which file is at PATH now (checkpoints are replaced by a rename: a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run the killed and the two-node runs must end identical to."""
    folder = tmp_path_factory.mktemp("reference")
    run, out = folder / "run", folder / "run.out"
    text = finish(
        torchrun(elastic(free_port()), [*ARGS, f"data.root={cifar}", f"hydra.run.dir={run}"], out, folder), out
    )
    assert "(identical)" in (run / "train.log").read_text(), text[-3000:]
    return run


def test_killed_ranks_torchrun_restarts_group_and_resumes_identical(cifar, reference, tmp_path, launched):
    """SIGKILL local rank 1 just after epoch 1's last.pt (mid-epoch 2), then local rank 0 of the restarted group (the
    rank that writes and hosts the group's store) just after its epoch-2 last.pt: each time the survivor stops at
    once with one line, torchrun restarts the group (both restarts used), the group resumes from last.pt, and the run
    ends with the uninterrupted run's weights and metrics."""
    run, out = tmp_path / "run", tmp_path / "run.out"
    args = [*ARGS, f"data.root={cifar}", "trainer.resume=auto", f"hydra.run.dir={run}"]
    t0 = time.monotonic()
    agent = torchrun(elastic(free_port()), args, out, tmp_path)
    launched.append(agent)
    log = run / "train.log"

    wait_for("last.pt", lambda: stamp(run / "last.pt") is not None, agent, out)
    first = worker_pid(agent, 1)
    os.kill(first, signal.SIGKILL)
    assert load(run / "last.pt")["epoch"] == 1, "the kill came too late to test a restart mid-run"

    wait_for("a resumed group", lambda: "resumed from" in log.read_text(), agent, out)
    resumed = stamp(run / "last.pt")
    wait_for("the restarted group's last.pt", lambda: stamp(run / "last.pt") != resumed, agent, out)
    second = worker_pid(agent, 0)
    assert second not in (first, agent.pid)
    os.kill(second, signal.SIGKILL)

    text = finish(agent, out)
    seconds = time.monotonic() - t0
    assert text.count("exitcode: -9") == 2, text[-4000:]  # torchrun saw both kills (and no other failure)
    assert text.count("another rank is gone") == 2, text[-4000:]  # each survivor: one line, no step finished
    history = log.read_text()
    assert f"resumed from {run}/last.pt at epoch 2 step 0" in history, history[-3000:]
    assert f"resumed from {run}/last.pt at epoch 3 step 0" in history, history[-3000:]
    assert CHECKSUMS.search(history), history[-3000:]
    assert_same_run(run, reference)
    print(f"two kills, two restarts, identical end in {seconds:.1f} s")


def checksum(state_dict: dict) -> float:
    """What distributed.check_ranks_agree computes and logs for each rank."""
    return torch.stack([t.detach().double().sum() for t in state_dict.values()]).sum().item()


def test_two_nodes_on_one_machine_readme_command(cifar, reference, tmp_path, launched):
    """README "Many GPUs, many nodes": two torchrun processes, one worker each, c10d rendezvous on 127.0.0.1 (each
    "node" in a working dir of its own, the run dir relative as in the README). They train as one group of two: the
    end equals the single-node 2-rank run bit for bit, only the node with global rank 0 wrote anything, and each
    rank's own checksum of its final weights is that of the weights rank 0 saved."""
    port, nodes = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    agents = launched
    for node_rank, cwd in enumerate(nodes):
        cwd.mkdir()
        launcher = [
            "--nnodes=2",
            f"--node_rank={node_rank}",
            "--nproc_per_node=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
        ]
        agents.append(
            torchrun(launcher, [*ARGS, f"data.root={cifar}", "hydra.run.dir=outputs/run"], Path(f"{cwd}.out"), cwd)
        )
    texts = [finish(agent, Path(f"{cwd}.out")) for agent, cwd in zip(agents, nodes)]

    # c10d assigns the ranks (torchrun ignores --node_rank with it): find the node that got global rank 0
    written = [sorted(p.name for p in cwd.iterdir()) for cwd in nodes]
    assert sorted(written) == [[], ["outputs"]], written  # one node wrote the run dir, the other nothing
    main = written.index(["outputs"])
    run = nodes[main] / "outputs" / "run"
    assert_same_run(run, reference)

    match = CHECKSUMS.search((run / "train.log").read_text())
    assert match, (run / "train.log").read_text()[-3000:]
    gathered = [float(s) for s in match.group(1).split(",")]
    own = re.search(r"weight checksum of rank 1: (\S+)", texts[1 - main])  # logged by rank 1 on its node
    assert own, texts[1 - main][-3000:]
    saved = checksum(load(run / "last.pt")["model"])
    assert len(gathered) == 2 and gathered == [saved, saved] and float(own.group(1)) == saved


# ----------------------------------------------------------------------------------------------------------------
# The store a restarted group gets: the dead group's keys are still in torchrun's store (no torchrun needed)


@pytest.fixture
def agent_store(monkeypatch):
    """A stand-in for torchrun's agent store, and the variables torchrun gives its workers."""
    server = tdist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    for key, value in (
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(server.port)),
        ("TORCHELASTIC_RUN_ID", "test"),
    ):
        monkeypatch.setenv(key, value)
    return server


def rank1_in_thread() -> tuple[threading.Thread, list]:
    got = []
    thread = threading.Thread(target=lambda: got.append(distributed.group_store(1, timedelta(seconds=60), 1.0)))
    thread.start()
    return thread, got


@pytest.mark.parametrize("taken_before", [True, False], ids=["rank1-took-it", "rank1-died-before-taking-it"])
def test_restarted_group_never_joins_the_dead_groups_store(agent_store, taken_before, caplog):
    """A restarted rank 1 that starts before the new rank 0 must wait for that rank 0's store, whether its previous
    process had taken the dead group's value (skipped at once) or died before (the dead store does not answer)."""
    timeout = timedelta(seconds=60)
    old0 = distributed.group_store(0, timeout)
    old1 = distributed.group_store(1, timeout, 1.0)
    assert old1.get("token") == old0.get("token")
    if not taken_before:
        tdist.PrefixStore("cvt_train/test/", agent_store).delete_key("taken/1")
    del old0, old1  # the group dies with its store

    caplog.set_level("DEBUG", logger="cvt_train")
    thread, got = rank1_in_thread()
    time.sleep(1.5)  # rank 1 polls the dead group's value meanwhile
    assert thread.is_alive() and not got, "rank 1 joined the dead group's store"
    new0 = distributed.group_store(0, timeout)
    thread.join(timeout=30)
    assert got and got[0].get("token") == new0.get("token")
    tried_dead_store = "no store at port" in caplog.text
    assert tried_dead_store != taken_before  # a value it took before is skipped without a connection
    third0 = distributed.group_store(0, timeout)  # and the generation after that
    assert distributed.group_store(1, timeout, 1.0).get("token") == third0.get("token") != new0.get("token")


def test_no_group_store_outside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed.group_store(0, timedelta(seconds=1)) is None
