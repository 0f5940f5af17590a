"""One DDP step of a MiniMoE student with 2 CPU processes (gloo), without find_unused_parameters.

Experts are forced idle per rank by a rank-local bias on the router logits (a forward hook, so
the parameters stay identical on both ranks): on rank 0 every token goes to the last expert (the
others get no token), on rank 1 the last expert gets no token. Every expert's parameters must
still enter DDP's all-reduce (a missing gradient raises at the next forward or hangs), and after
the optimizer step both ranks must hold identical parameters.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch

WORLD = 2
TIMEOUT_S = 90  # whole test; a hang in the all-reduce ends here instead of blocking the suite


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Step(torch.nn.Module):
    """The DDP-wrapped part of a MiniMoE module: student + relation projection (the teacher is
    not a submodule); forward = the training loss, as `training_step` computes it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        m = self.module
        terms = m.loss_terms(m.teacher_qkv(batch), m.student_qkv(batch), batch["attention_mask"])
        return m.combine(terms)


def _batch(rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(1000, 5000, (4, 12), generator=g)
    attention_mask = torch.ones(4, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[3, 5:] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids)}  # fmt: skip


def _worker(rank: int, port: int, teacher_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lmdistill.methods import MiniMoE
    from lmdistill.models import MoESettings, build_student, load_teacher, moe_student

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S // 2)
    )
    try:
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        teacher = load_teacher(teacher_dir)
        dense = build_student(teacher.config, num_hidden_layers=2, hidden_size=32,
                              num_attention_heads=4, intermediate_size=64)  # fmt: skip
        student = moe_student(dense, MoESettings(attention_experts=2, ffn_experts=4))
        module = MiniMoE(teacher, student, relation_heads=4)
        module.freeze_unreached()
        step = DistributedDataParallel(_Step(module))  # find_unused_parameters=False (default)
        for layer in module.student.encoder.layer:
            for router in (layer.attention.router, layer.ffn.router):
                shift = torch.zeros(router.num_experts)
                shift[-1] = 1e4 if rank == 0 else -1e4  # rank 0: all to the last; rank 1: none

                def hook(_mod, _args, out, shift=shift):
                    return out + shift.to(out.dtype)

                router.classifier.register_forward_hook(hook)
        before = {k: v.detach().clone() for k, v in step.module.state_dict().items()}
        params = [p for p in step.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        batch = _batch(rank)
        step(batch).backward()
        loads = []
        for r in module.student.routing:
            e = r.stats.probs.shape[-1]
            counts = torch.bincount(r.stats.expert[r.stats.real], minlength=e)[:e]
            loads.append(counts.tolist())
        missing = [n for n, p in step.named_parameters() if p.requires_grad and p.grad is None]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = {k: v.detach().clone() for k, v in step.module.state_dict().items()}
        step(batch).backward()  # DDP raises here if the previous reduction did not finish
        dist.barrier()
        torch.save({"before": before, "after": after, "loads": loads, "missing": missing},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_one_ddp_step_with_idle_experts(tiny_teacher_dir, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, port, tiny_teacher_dir, str(tmp_path)))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    if hung:
        pytest.fail(f"DDP step did not finish in {TIMEOUT_S} s (hang in the all-reduce?)")
    assert [p.exitcode for p in procs] == [0] * WORLD

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["missing"] == [] and r1["missing"] == []
    assert len(r0["loads"]) == 4  # 2 layers x (attention, ffn)
    for l0, l1 in zip(r0["loads"], r1["loads"], strict=True):
        assert all(c == 0 for c in l0[:-1]) and l0[-1] > 0  # rank 0: only the last expert
        assert l1[-1] == 0 and sum(l1) > 0  # rank 1: the last expert idle
    for name, value in r0["before"].items():  # DDP broadcast rank 0's init
        assert torch.equal(value, r1["before"][name]), name
    changed = [n for n, v in r0["after"].items() if not torch.equal(v, r0["before"][n])]
    assert any(".ffn.in_weight" in n for n in changed) and any("router" in n for n in changed)
    for name, value in r0["after"].items():  # all-reduced gradients: identical updates
        assert torch.equal(value, r1["after"][name]), name
