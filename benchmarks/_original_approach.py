"""A small, faithful re-implementation of the original research code's MiniLM v2 step (baseline).

Used by `benchmarks/distill_step.py` (CPU, float32) and `benchmarks/gpu_step.py` (any device;
float32, or float16 autocast with a GradScaler as the original code trains) as the "original
approach" baseline. It keeps
the original code's costs that docs/methods.md section 11 lists as defects, so the comparison is honest:

* the teacher is the **full, untruncated** model (all 6 layers and the pooler), run under
  `torch.no_grad()` (not `inference_mode`), with **eager** attention (the attention-probability
  tensors are materialised in every layer);
* the student is the full 3-layer model (last layer's attention output, FFN and pooler included)
  with eager attention and dropout 0.1, and **every** student parameter is in AdamW (the
  optimizer's default CPU per-parameter loop, as plain `torch.optim.AdamW(...)` gives);
* Q-Q, K-K and V-V relations are computed in **every** layer of teacher and student (9 layers x 3
  relations of [B, R, L, L] float32), although only the last pair (teacher layer 6, student
  layer 3) enters the loss;
* the relation probabilities come from softmax on the **padded** batch (additive -10000 key mask,
  as BERT's extended attention mask), the student's relation probabilities get **dropout**, and
  the KL uses `log(p + 1e-7)` with plain autograd (no closed-form gradient, no chunking).

The loss averages the KL over valid (non-pad) query rows, like lmdistill's "rows" reduction, so
both report comparable loss values. Gradient clipping 5.0 as in the recipe.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

EPS = 1e-7


def _capture_qkv(model):
    """Forward hooks on query/key/value of every layer; returns the list they append to."""
    store: list[dict] = []
    for layer in model.encoder.layer:
        slot: dict = {}
        store.append(slot)
        attention = layer.attention.self
        for name in ("query", "key", "value"):

            def hook(_module, _inputs, output, slot=slot, name=name):
                slot[name] = output

            getattr(attention, name).register_forward_hook(hook)
    return store


def _relation_probs(x, ext_mask, num_heads, dropout_p, training):
    """softmax(X_h X_h^T / sqrt(r) + ext_mask) [B, R, L, L], dropout on the probabilities."""
    b, length, d = x.shape
    r = d // num_heads
    xh = x.view(b, length, num_heads, r).permute(0, 2, 1, 3)
    scores = torch.matmul(xh, xh.transpose(-1, -2)) / math.sqrt(r) + ext_mask
    probs = F.softmax(scores, dim=-1)
    return F.dropout(probs, p=dropout_p, training=training)


class OriginalMiniLMv2:
    """teacher path + student config -> one full original-style training step per `step(batch)`."""

    def __init__(self, teacher_path, student_config, relation_heads=32, device="cpu", fp16=False):
        config = AutoConfig.from_pretrained(teacher_path)
        self.device = torch.device(device)
        self.fp16 = fp16  # float16 autocast + GradScaler (the original code's `--fp16`)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.teacher = AutoModel.from_pretrained(
            teacher_path, config=config, attn_implementation="eager"
        ).to(self.device)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = AutoModel.from_config(student_config, attn_implementation="eager")
        self.student.to(self.device).train()
        self.t_store = _capture_qkv(self.teacher)
        self.s_store = _capture_qkv(self.student)
        self.heads = relation_heads
        self.dropout = student_config.attention_probs_dropout_prob
        decay = [p for n, p in self.student.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.student.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=3e-4,
            eps=1e-6,
        )

    def _all_relations(self, store, ext_mask, training):
        return [
            {
                k: _relation_probs(slot[k], ext_mask, self.heads, self.dropout, training)
                for k in slot
            }
            for slot in store
        ]

    def loss(self, batch):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        mask = batch["attention_mask"]
        ext_mask = (1.0 - mask[:, None, None, :].to(torch.float32)) * -10000.0  # [B, 1, 1, L]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            self.teacher(**inputs, output_attentions=True)
            t_rel = self._all_relations(self.t_store, ext_mask, training=False)
        self.student(**inputs, output_attentions=True)
        s_rel = self._all_relations(self.s_store, ext_mask, self.student.training)
        valid = mask.to(torch.float32)[:, None, :]  # [B, 1, L] query rows
        total = 0.0
        for name in ("query", "key", "value"):  # the last layer pair only
            p_t, p_s = t_rel[-1][name], s_rel[-1][name]
            kl = (p_t * (torch.log(p_t + EPS) - torch.log(p_s + EPS))).sum(-1)  # [B, R, L]
            total = total + (kl * valid).sum() / (valid.sum() * self.heads)
        return total / 3.0

    def step(self, batch):
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            loss = self.loss(batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 5.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        for store in (self.t_store, self.s_store):
            for slot in store:
                slot.clear()
        return loss.detach()
