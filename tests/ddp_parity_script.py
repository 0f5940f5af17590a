"""Train MiniLM v2 on fixed batches with `devices` CPU processes; write each rank's losses.

    python ddp_parity_script.py <teacher_dir> <devices> <out_dir>

The global batch is 8 sequences of equal length (no padding), so the mean of the per-rank mean
losses equals the single-process mean. With 2 devices rank r trains on the sequences r, r+2,
r+4, r+6 of each global batch: together the same 8 as one process. DDP
must then follow the single-process loss trajectory. Run as a script: Lightning's DDP launcher
re-runs it for rank 1.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmdistill.distributed import HydraDDPStrategy
from lmdistill.methods import MiniLMv2
from lmdistill.models import build_student, load_teacher

GLOBAL_BATCH, STEPS, LENGTH = 8, 6, 16


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main(teacher_dir: str, devices: int, out_dir: str) -> None:
    torch.manual_seed(0)
    teacher = load_teacher(teacher_dir)
    torch.manual_seed(1)  # not the tiny teacher's own seed: the student must differ from it
    student = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                            num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)  # fmt: skip
    module = MiniLMv2(teacher, student, relation_heads=4, optim={"lr": 1e-2, "warmup_steps": 0})
    module.freeze_unreached()
    ids = torch.randint(
        1000, 5000, (GLOBAL_BATCH * STEPS, LENGTH), generator=torch.Generator().manual_seed(1)
    )
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "token_type_ids": torch.zeros_like(x)}
            for x in ids]  # fmt: skip
    recorder = LossRecorder()
    strategy = HydraDDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder],
                        use_distributed_sampler=False)  # fmt: skip
    # rank r: sequences r, r + devices, ... (the rank is known once the Trainer exists)
    shard = rows[trainer.global_rank :: devices]
    trainer.fit(module, DataLoader(shard, batch_size=GLOBAL_BATCH // devices, shuffle=False))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(recorder.losses))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
