"""Once-for-all MiniLM (docs/methods.md section 7): one weight-shared super-net, many students.

The student (its shape: the largest sub-network) becomes an `OFABertModel` whose family is
`ofa.layers` x `ofa.hidden`. A step: one teacher forward; for each sub-network the sampler
picks (sandwich: largest, smallest, `ofa.random_subnets` random ones; all: the whole family,
drawn from (seed, global step) only, so resumes are exact and every rank trains the same ones)
the MiniLM v2 relation loss of its relation site; the step's loss is their mean. The export
(student/) is the super-net; `lmdistill-export-subnet RUN_DIR l h` carves dense students, and
`ofa.export` lists those carved into <run>/subnets/ once training has finished.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.nn import functional as F

from lmdistill.errors import UserError
from lmdistill.methods.base import DistillationMethod, model_inputs
from lmdistill.methods.relations import (
    check_reduction,
    check_relation_site,
    check_relation_weights,
    relation_settings,
    self_relation_terms,
    top_projection,
    weighted_relation,
)
from lmdistill.models.capture import QKV, forward_qkv
from lmdistill.models.features import FeatureRequest
from lmdistill.models.ofa_config import ofa_config, subnet_shape
from lmdistill.models.ofa_export import export_subnet, subnet_name, subnet_table
from lmdistill.models.ofa_model import OFABertModel
from lmdistill.models.ofa_sampling import SubnetSampler, family_sizes

log = logging.getLogger("lmdistill")


def as_supernet(student, layers: list[int], hidden: list[int]) -> OFABertModel:
    """The student as a super-net of family `layers` x `hidden` (a dense BERT's weights kept)."""
    if isinstance(student, OFABertModel):
        student.config = ofa_config(student.config, layers, hidden)
        student.config._attn_implementation = "sdpa"
        return student
    if getattr(student.config, "model_type", None) != "bert":
        raise UserError(
            f"method=ofa_minilm trains BERT super-nets but the student is a "
            f"{student.config.model_type!r} model; use a BERT teacher and moe=1x1"
        )
    return OFABertModel.from_dense(student, layers, hidden)


def check_exports(pairs, config) -> list[tuple[int, int]]:
    """`ofa.export` as (l, h) pairs, each a sub-network of the super-net, or a `UserError`; a
    warning names a pair outside the trained family (exported, but not trained for)."""
    pairs = list(pairs or [])
    out = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(
                f"ofa.export entry {pair!r} is not an [l, h] pair; write e.g. "
                "'ofa.export=[[6,768],[4,384]]'"
            )
        layers, hidden = pair
        try:
            subnet_shape(config, layers, hidden)
        except UserError as err:
            raise UserError(f"ofa.export: {err}") from None
        if (layers, hidden) in out:
            raise UserError(f"ofa.export lists [{layers}, {hidden}] twice; list it once")
        out.append((layers, hidden))
        if (layers, hidden) not in config.family():
            log.warning(
                "ofa.export [%d, %d] is not in the trained family %s x %s: it is exported but "
                "not trained for", layers, hidden, config.ofa_layers, config.ofa_hidden,
            )  # fmt: skip
    return out


class OFAMiniLM(DistillationMethod):
    """MiniLM v2 relations averaged over the sampled sub-networks of a weight-shared super-net."""

    def __init__(
        self,
        teacher,
        student,
        ofa: dict | None = None,
        relation_heads: int = 32,
        relation_weights: dict | None = None,
        reduction: str = "rows",
        relation_site: str | None = None,
        seed: int = 0,
        export_student: bool = True,
        optim: dict | None = None,
    ):
        ofa = {"layers": None, "hidden": None, "sampling": "sandwich", "random_subnets": None,
               "export": [], **(ofa or {})}  # fmt: skip
        c = student.config
        layers = family_sizes("ofa.layers", ofa["layers"], c.num_hidden_layers)
        hidden = family_sizes("ofa.hidden", ofa["hidden"], c.hidden_size)
        student = as_supernet(student, layers, hidden)
        for who, size in [("teacher", teacher.hidden_size)] + [("sub-network", h) for h in hidden]:
            if relation_heads < 1 or size % relation_heads:
                raise UserError(
                    f"method.relation_heads={relation_heads} does not divide the {who} hidden "
                    f"size {size}; choose relation heads that divide it and every ofa.hidden"
                )
        super().__init__(teacher, student, optim)
        self.sampler = SubnetSampler(
            student.config.ofa_layers, student.config.ofa_hidden, ofa["sampling"],
            ofa["random_subnets"], seed,
        )  # fmt: skip
        self.export = check_exports(ofa["export"], student.config)
        if self.export and not export_student:
            raise UserError(
                "ofa.export needs export=true (sub-networks are exported with the super-net); "
                "set export=true or ofa.export=[]"
            )
        self.relation_heads = int(relation_heads)
        self.relation_weights = check_relation_weights(relation_weights)
        self.reduction = check_reduction(reduction)
        self.relation_site = check_relation_site(relation_site, "top_projection")
        top = self.relation_site == "top_projection"
        self.relation_projection = top_projection(student) if top else None  # Linear(d, 3d)

    def teacher_request(self) -> FeatureRequest:
        return FeatureRequest(qkv_layer=self.teacher.layer)

    def student_inputs(self, batch: dict) -> dict:
        """The student's inputs with a [B, 1, 1, L] boolean key mask (no host read), or none
        where the host-side plan shows no padding."""
        inputs = model_inputs(batch, self.student.config)
        mask, plan = batch["attention_mask"], self.batch_plan
        no_padding = plan is not None and min(plan.counts) == mask.shape[1]
        inputs["attention_mask"] = None if no_padding else (mask != 0)[:, None, None, :]
        return inputs

    def subnet_qkv(self, layers: int, hidden: int, inputs: dict) -> QKV:
        """Q/K/V [B, L, h] of the active sub-network at the relation site: its last layer's
        projections, or the top projection's leading [h, h] blocks on its final hidden states."""
        if self.relation_projection is None:
            return forward_qkv(self.student, layers - 1, **inputs)
        states = self.student(**inputs).last_hidden_state  # [B, L, h]
        d, h = self.student.config.hidden_size, hidden
        weight = self.relation_projection.weight.view(3, d, d)[:, :h, :h].reshape(3 * h, h)
        bias = self.relation_projection.bias.view(3, d)[:, :h].reshape(3 * h)
        return QKV(*F.linear(states, weight, bias).chunk(3, dim=-1))

    def step_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        teacher = self.teacher_features(batch).qkv
        inputs = self.student_inputs(batch)
        subnets = self.sampler(self.global_step)  # the same for every micro-batch of a step
        losses = []
        try:
            for layers, hidden in subnets:
                self.student.set_subnet(layers, hidden)
                student = self.subnet_qkv(layers, hidden, inputs)
                terms = self_relation_terms(teacher, student, batch["attention_mask"],
                                            self.relation_heads, self.relation_weights,
                                            self.reduction, self.batch_plan)  # fmt: skip
                losses.append(weighted_relation(terms, self.relation_weights))
        finally:
            full = self.sampler.family[0]
            self.student.set_subnet(*full)
        smallest = subnets.index(self.sampler.ends[-1])
        terms = {"loss_largest": losses[0], "loss_smallest": losses[smallest]}
        return torch.stack(losses).mean(), terms

    def validation_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The largest sub-network's relation loss and terms: one fixed network (the sampled
        mean would change with the step), also what the STS-B probe embeds."""
        layers, hidden = self.sampler.family[0]
        self.student.set_subnet(layers, hidden)  # as outside `step_loss`
        student = self.subnet_qkv(layers, hidden, self.student_inputs(batch))
        terms = self_relation_terms(self.teacher_features(batch).qkv, student,
                                    batch["attention_mask"], self.relation_heads,
                                    self.relation_weights, self.reduction, self.batch_plan)  # fmt: skip
        return weighted_relation(terms, self.relation_weights), terms

    def export_extras(self, out_dir, tokenizer: str, provenance: dict) -> dict:
        """`ofa.export`: each listed sub-network as a dense BERT in <run>/subnets/L<l>-H<h>."""
        if not self.export:
            return {}
        supernet_dir = Path(out_dir) / "student"
        record = {**provenance, "supernet_dir": str(supernet_dir.resolve())}
        paths = {}
        for layers, hidden in self.export:
            name = subnet_name(layers, hidden)
            target = Path(out_dir) / "subnets" / name
            export_subnet(self.student, layers, hidden, tokenizer, target, provenance=record)
            paths[name] = str(target)
        return {"subnet_exports": paths}

    def summary_fields(self) -> dict:
        s = self.sampler
        return {
            **super().summary_fields(),
            **relation_settings(self),
            "ofa": {
                "layers": list(s.layers),
                "hidden": list(s.hidden),
                "sampling": s.sampling,
                "random_subnets": s.random_subnets,
                "subnets_per_step": s.per_step,
                "subnets": subnet_table(self.student.config),
            },
        }
