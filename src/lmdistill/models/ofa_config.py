"""Configuration of once-for-all super-nets and the shape of their sub-networks (docs/methods.md section 7).

A super-net is a BERT encoder (d hidden, A heads of a = d / A dims, FFN width I) whose
sub-network (l, h) is: the first l layers; in each, the leading h / a heads, the leading
I h / d FFN neurons (4h for BERT's I = 4d) and the leading h hidden dims; embeddings, every
LayerNorm and the pooler sliced to the leading h dims. `ofa_layers` x `ofa_hidden` is the family
trained together; any other valid (l, h) is still a sub-network (exportable, not trained for).
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import BertConfig

from lmdistill.errors import UserError


class SubnetShape(NamedTuple):
    """The dense BERT shape of sub-network (layers, hidden)."""

    layers: int  # l: the first l layers
    hidden: int  # h: leading hidden dims
    heads: int  # h / a leading heads per layer
    intermediate: int  # leading FFN neurons per layer (I h / d)


class OFABertConfig(BertConfig):
    """BertConfig of the super-net (its largest sub-network) plus the trained family.

    `ofa_layers` / `ofa_hidden`: the layer counts and hidden sizes whose product is trained
    (None: only the full size). Every hidden size must be a multiple of the head size.
    """

    model_type = "lmdistill-ofa"

    ofa_layers: list[int] | None = None  # layer counts of the family, e.g. [6, 4, 3]
    ofa_hidden: list[int] | None = (
        None  # hidden sizes of the family, e.g. [768, 512, 384, 256, 192]
    )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.ofa_layers or [self.num_hidden_layers]
        hidden = self.ofa_hidden or [self.hidden_size]
        self.ofa_layers = sorted({int(x) for x in layers}, reverse=True)
        self.ofa_hidden = sorted({int(x) for x in hidden}, reverse=True)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def family(self) -> list[tuple[int, int]]:
        """Every trained sub-network (l, h), largest first: layers outer, hidden inner."""
        return [(lay, hid) for lay in self.ofa_layers for hid in self.ofa_hidden]


def subnet_shape(config: BertConfig, layers: int, hidden: int) -> SubnetShape:
    """The shape of sub-network (layers, hidden) of a super-net with `config`, or a `UserError`."""
    d, n, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    a = d // heads
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise UserError(
            f"sub-network layers l={layers!r} is impossible for a {n}-layer super-net; "
            f"choose l in 1..{n}"
        )
    if (
        isinstance(hidden, bool)
        or not isinstance(hidden, int)
        or not 0 < hidden <= d
        or hidden % a
        or (config.intermediate_size * hidden) % d
    ):
        raise UserError(
            f"sub-network hidden h={hidden!r} is impossible for a {d}-wide super-net with "
            f"{a}-dim heads; choose a multiple of {a} up to {d}"
        )
    return SubnetShape(layers, hidden, hidden // a, config.intermediate_size * hidden // d)


def ofa_config(
    config: BertConfig, ofa_layers: list[int] | None = None, ofa_hidden: list[int] | None = None
) -> OFABertConfig:
    """The super-net config of a dense BERT `config` (same shape, vocabulary and settings) with
    the family `ofa_layers` x `ofa_hidden`; a `UserError` names a member that is no sub-network."""
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "ofa_layers", "ofa_hidden"):
        fields.pop(key, None)
    result = OFABertConfig(**fields, ofa_layers=ofa_layers, ofa_hidden=ofa_hidden)
    for lay, hid in result.family():
        subnet_shape(result, lay, hid)
    return result


def dense_config(config: BertConfig, layers: int, hidden: int) -> BertConfig:
    """A plain `BertConfig` (model type "bert") of sub-network (layers, hidden)."""
    shape = subnet_shape(config, layers, hidden)
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "ofa_layers", "ofa_hidden"):
        fields.pop(key, None)
    fields.update(
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        architectures=["BertModel"],
    )
    return BertConfig(**fields)
