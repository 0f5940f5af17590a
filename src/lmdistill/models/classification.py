"""The sequence-classification head of lmdistill's own encoders (MiniMoE, sparse), as BERT's."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class EncoderForSequenceClassification:
    """Mixin: `encoder_class(config)` as `self.bert` + dropout + a linear classifier on the
    pooled output, with BERT's loss (regression, single- or multi-label by
    `config.problem_type`). Put it before the model's `PreTrainedModel` base and name
    `encoder_class`."""

    encoder_class: type[nn.Module]

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = self.encoder_class(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))  # [B, num_labels]
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1).float())
        if self.config.problem_type == "single_label_classification":
            return nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
