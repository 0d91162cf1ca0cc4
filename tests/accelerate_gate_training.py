"""Gate training run by tests/test_accelerate_gates.py, in one process or under `accelerate launch`.

Usage: python accelerate_gate_training.py EXPERT_DIR OUT_FILE
"""

from __future__ import annotations

import sys
import warnings

import torch
from accelerate import Accelerator
from peft import get_peft_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_llama  # noqa: E402

from peft_glider import GateTrainingArguments, GliderConfig, train_gates  # noqa: E402


def main(expert_dir: str, out_file: str) -> None:
    accelerator = Accelerator(cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), GliderConfig(experts=[expert_dir], top_k=1))
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 97, (int(n),), generator=generator).tolist()} for n in torch.randint(5, 12, (24,), generator=generator)]
    for row in data:
        row["labels"] = list(row["input_ids"])
    args = GateTrainingArguments(steps=6, batch_size=8, learning_rate=1e-2)
    gates = train_gates(model, model.base_model.expert_names[0], data, args=args, accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        torch.save({**gates, "__processes__": torch.tensor(accelerator.num_processes)}, out_file)
    # Both ranks leave the process group together: a rank exiting while gloo's threads still run aborted the other
    # one at exit ("terminate called without an active exception", about one launch in twelve).
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
