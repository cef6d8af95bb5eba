"""`qattune run` under torchrun: option checks, workers' errors printed once by each launcher, several nodes,
rendezvous timeouts, and signals (Ctrl-C, SIGTERM), each one line with the matching exit code."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import FIXTURES, SUM_RECIPE, qattune, run_main

from qattune.cli.main import RUN_USAGE
from qattune.errors import REPORT_DIR_ENV, report

STOP_RECIPE = FIXTURES / "stop_recipe.py"
QUIET = {"OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: {tmp_path}/out\n")
    return path


def start(*args: str) -> subprocess.Popen:
    """`qattune run ARGS` in its own process group, as a terminal or a scheduler starts it."""
    return subprocess.Popen([sys.executable, "-m", "qattune.cli.main", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, **QUIET})


def wait_for(path: Path, proc: subprocess.Popen, count: int = 1) -> None:
    """Until `count` ranks of `proc` have written their ready file into `path`."""
    deadline = time.monotonic() + 120
    while len(list(path.glob("ready*"))) < count:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("options, message", [
    (["--nproc_per_node", "0"], "--nproc_per_node must be a number of processes per node, 1 or more (or auto, cpu, "
                                "gpu, xpu), got '0'"),
    (["--nproc_per_node", "-1"], "--nproc_per_node must be a number of processes per node, 1 or more (or auto, "
                                 "cpu, gpu, xpu), got '-1'"),
    (["--nproc_per_node", "x"], "--nproc_per_node must be a number of processes per node, 1 or more (or auto, cpu, "
                                "gpu, xpu), got 'x'"),
    (["--nnodes", "two"], "--nnodes must be a number of nodes such as 2 (or MIN:MAX such as 1:4), got 'two'"),
    (["--rdzv_backend", "foo"], "unknown --rdzv_backend 'foo'. Use c10d (one of: c10d, etcd, etcd-v2, static)"),
    (["--nnodes", "2", "--rdzv_endpoint", "localhost:notaport"],
     "--rdzv_endpoint must be HOST:PORT with PORT a number (e.g. node0:29500), got 'localhost:notaport'"),
    (["--nnodes", "2"], "--nnodes 2 runs on several nodes: give every node the same --rdzv_endpoint HOST:PORT, HOST "
                        "being one of them (e.g. --rdzv_endpoint node0:29500)"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "node0"],
     "--node_rank 2 is out of range for --nnodes 2: number the nodes 0 to 1"),
    (["--nnodes", "2", "--master_addr", "node0"],
     "the static rendezvous (--rdzv_backend static, or --master_addr) with --nnodes 2 needs a different --node_rank "
     "on each node, 0 to 1 (0 on the node at node0:29500); or give only --rdzv_endpoint HOST:PORT, which numbers "
     "the nodes itself"),
    (["--nnodes", "2", "--standalone"], "--standalone runs on one node, not --nnodes 2: drop it and give every node "
                                        "the same --rdzv_endpoint HOST:PORT"),
    (["--start_method", "thread"], "torchrun argument --start-method/--start_method: invalid choice: 'thread' "
                                   "(choose from 'spawn', 'fork', 'forkserver'). See `torchrun --help`"),
])
def test_torchrun_options_are_checked_before_launching(tmp_path, capsys, options, message):
    code, out, err = run_main(capsys, "run", *options, str(SUM_RECIPE), "--config", str(config(tmp_path)))
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_help_among_torchrun_options_is_runs_help(capsys):
    code, out, _ = run_main(capsys, "run", "--nproc_per_node", "2", "--help")
    assert (code, out) == (0, RUN_USAGE + "\n")
    assert "qattune uses --rdzv_backend c10d and --rdzv_id qattune" in " ".join(out.split())


def test_a_report_goes_to_the_launchers_folder_or_from_rank_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    report("disk full")
    assert capsys.readouterr().err == ""  # another launcher's rank 1: rank 0 speaks
    monkeypatch.setenv("RANK", "0")
    report("disk full")
    assert capsys.readouterr().err == "error: disk full\n"
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))
    report("disk full\nsecond line", kind="interrupted")
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "rank0.json").read_text()) == {"rank": 0, "kind": "interrupted",
                                                                 "message": "disk full\nsecond line"}


def test_each_distinct_worker_error_is_printed_once(tmp_path):
    cfg = config(tmp_path)
    code, out, err = qattune("run", "--nproc_per_node", "2", str(STOP_RECIPE), "--config", str(cfg),
                             "fail_ranks=[0,1]", "fail_message=disk full", env=QUIET)
    assert (code, err) == (2, "error: disk full\n")
    code, out, err = qattune("run", "--nproc_per_node", "2", str(STOP_RECIPE), "--config", str(cfg),
                             "fail_ranks=[0,1]", env=QUIET)
    assert (code, err.splitlines()) == (2, ["error (rank 0): missing file /data/part0.bin",
                                            "error (rank 1): missing file /data/part1.bin"])


def test_two_nodes_meet_at_an_endpoint_and_each_prints_its_own_error(tmp_path):
    """DESIGN's multi-node command, without --rdzv_backend; node B misses a file, node A has it."""
    port = free_port()
    launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_endpoint", f"localhost:{port}", str(STOP_RECIPE),
              "--config", str(config(tmp_path))]
    node_a = start(*launch)
    node_b = start(*launch, "fail_ranks=[0,1]", "fail_message=missing file /data/shard.bin")
    _, err_b = node_b.communicate(timeout=180)
    node_a.communicate(timeout=180)
    assert node_b.returncode == 2 and node_a.returncode != 0
    waiting = f"waiting for 2 nodes at localhost:{port} (rendezvous timeout 600 s)"
    assert err_b.splitlines() == [waiting, "error: missing file /data/shard.bin"]


@pytest.mark.parametrize("options, timeout_key, joined", [
    (["--rdzv_endpoint", "localhost:{port}", "--rdzv_conf", "join_timeout=1"], "join_timeout", ""),
    (["--master_addr", "localhost", "--master_port", "{port}", "--node_rank", "0", "--rdzv_conf", "timeout=1"],
     "timeout", " (1 of 2 joined)"),
])
def test_a_node_alone_gives_up_after_the_rendezvous_timeout_in_one_line(tmp_path, options, timeout_key, joined):
    port = free_port()
    options = [option.format(port=port) for option in options]
    code, out, err = qattune("run", "--nnodes", "2", "--nproc_per_node", "1", *options, str(SUM_RECIPE), "--config",
                             str(config(tmp_path)), env=QUIET)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"waiting for 2 nodes at localhost:{port} (rendezvous timeout 1 s)",
        f"error: timed out after 1 s waiting for 2 nodes at localhost:{port}{joined}: start the same command on every "
        f"node, or wait longer with --rdzv_conf {timeout_key}=SECONDS",
    ]


def test_ctrl_c_while_waiting_for_the_other_nodes_is_one_line(tmp_path):
    """The static rendezvous waits in C++, deaf to Python's signal handlers until its 15-minute timeout."""
    proc = start("--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "localhost", "--master_port",
                 str(free_port()), "--node_rank", "0", str(STOP_RECIPE), "--config", str(config(tmp_path)))
    assert proc.stderr.readline().startswith("waiting for 2 nodes at localhost:")
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, f"interrupted: no checkpoint was written to {tmp_path}/out yet, so there "
                                           "is nothing to resume: run again to start over\n")


def test_sigterm_to_a_torchrun_process_group_is_one_line(tmp_path):
    proc = start("--nproc_per_node", "2", str(STOP_RECIPE), "--config", str(config(tmp_path)), "checkpoints=2",
                 "wait=60")
    wait_for(tmp_path / "out", proc, count=2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (143, "interrupted: checkpoints are written whole or not at all; resume_from_"
                                           f"checkpoint=true continues from the latest, {tmp_path}/out/step_2\n")


def test_sigterm_to_one_process_is_handled_as_ctrl_c(tmp_path):
    proc = start(str(STOP_RECIPE), "--config", str(config(tmp_path)), "checkpoints=1", "wait=60")
    wait_for(tmp_path / "out", proc)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (143, "interrupted: checkpoints are written whole or not at all; resume_from_"
                                           f"checkpoint=true continues from the latest, {tmp_path}/out/step_1\n")
