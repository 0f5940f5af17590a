"""Configuration of sparse students: a BERT encoder with its own head count and FFN width per layer."""

from __future__ import annotations

from transformers import BertConfig


class SparseBertConfig(BertConfig):
    """BertConfig plus the per-layer shape left by structured pruning (docs/methods.md section 6).

    `hidden_size` is the kept hidden size d' (shared by embeddings and every layer); layer i has
    `layer_heads[i]` heads of `head_size` dims each and `layer_intermediate[i]` FFN neurons; a
    layer with 0 heads (0 neurons) skips its attention (FFN) sublayer. `num_attention_heads` and
    `intermediate_size` hold the largest per-layer values (for tools that read them); they do not
    decide the shape. `padded_positions`: the embeddings number positions as RoBERTa's do
    (real tokens from pad_token_id + 1, padding at pad_token_id), as the sliced teacher did.
    """

    model_type = "lmdistill-sparse"

    layer_heads: list[int] | None = None  # heads kept in each layer (None: num_attention_heads)
    layer_intermediate: list[int] | None = None  # FFN neurons kept in each layer
    head_size: int = 0  # dims per head (0: hidden_size // num_attention_heads)
    sparsity: float | None = None  # target sparsity (percent) this shape was planned for
    padded_positions: bool = False  # positions numbered from pad_token_id + 1 (RoBERTa, XLM-R)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        if not self.head_size:
            self.head_size = self.hidden_size // self.num_attention_heads
        if self.layer_heads is None:
            self.layer_heads = [self.num_attention_heads] * layers
        if self.layer_intermediate is None:
            self.layer_intermediate = [self.intermediate_size] * layers
        self.layer_heads = [int(h) for h in self.layer_heads]
        self.layer_intermediate = [int(i) for i in self.layer_intermediate]
        if len(self.layer_heads) != layers or len(self.layer_intermediate) != layers:
            raise ValueError(
                f"layer_heads and layer_intermediate need {layers} entries (num_hidden_layers), "
                f"got {len(self.layer_heads)} and {len(self.layer_intermediate)}"
            )
