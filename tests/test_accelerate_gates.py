"""Gate training data-parallel on two CPU processes under `accelerate launch` equals one process.

accelerate 1.15's `launch --cpu --num_processes 2` starts a single process (its simple launcher only fans out
through an MPI hostfile), so two CPU processes are launched with `--multi_gpu` (torchrun) and the script's
`Accelerator(cpu=True)` makes them a gloo process group.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import make_expert, tiny_llama

SCRIPT = Path(__file__).with_name("accelerate_gate_training.py")
TOLERANCE = 1e-5  # float summation order differs between one and two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_same_gates_as_one(tmp_path):
    expert = make_expert(tiny_llama, tmp_path / "expert", seed=4, r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(SCRIPT), expert, str(tmp_path / "one.pt")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    two = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(SCRIPT), expert, str(tmp_path / "two.pt")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, parallel = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert int(single.pop("__processes__")) == 1 and int(parallel.pop("__processes__")) == 2
    assert set(single) == set(parallel) and len(single) == 6
    for module in single:
        assert single[module].abs().sum() > 0
        torch.testing.assert_close(parallel[module], single[module], atol=TOLERANCE, rtol=0)
