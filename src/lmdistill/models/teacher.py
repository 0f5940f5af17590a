"""Load a frozen, truncated teacher from the Hugging Face hub or a local directory."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.utils import logging as hf_logging

from lmdistill.errors import UserError
from lmdistill.models.capture import QKV, encoder_layers, forward_qkv, self_attention
from lmdistill.models.features import FeatureRequest, Features, forward_features

_LOCAL_PREFIXES = ("/", "./", "../", "~")


@dataclass
class Teacher:
    """A frozen encoder truncated after its distilled layer.

    `config` is the full, untruncated config (students are derived from it); `layer` is the
    1-indexed distilled layer; `model` holds layers 1..layer only, in `eval()` mode.
    """

    name_or_path: str
    config: PretrainedConfig
    layer: int
    model: nn.Module

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_attention_heads(self) -> int:
        return self.config.num_attention_heads

    @torch.inference_mode()
    def qkv(self, input_ids, attention_mask, token_type_ids=None) -> QKV:
        """Q, K, V [B, L, d] of the distilled layer; never builds an autograd graph."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.config.type_vocab_size > 1:
            inputs["token_type_ids"] = token_type_ids
        return forward_qkv(self.model, self.layer - 1, **inputs)

    @torch.inference_mode()
    def features(self, request: FeatureRequest, **inputs: torch.Tensor) -> Features:
        """Exactly the `request`ed features (inference tensors), computed up to its top layer."""
        if request.top_layer > self.layer:
            raise UserError(
                f"the method needs teacher layer {request.top_layer} but the teacher was loaded up "
                f"to layer {self.layer}; set teacher.layer={request.top_layer} or higher"
            )
        if inputs.get("token_type_ids") is not None and self.config.type_vocab_size <= 1:
            inputs.pop("token_type_ids")
        return forward_features(self.model, request, **inputs)

    def to(self, *args, **kwargs) -> Teacher:
        self.model.to(*args, **kwargs)
        return self


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bar (errors still raise)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _load_config(name_or_path: str, revision: str | None, trust_remote_code: bool):
    looks_local = name_or_path.startswith(_LOCAL_PREFIXES) or os.sep in name_or_path.strip("/")
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        if name_or_path.count("/") != 1 or name_or_path.startswith(_LOCAL_PREFIXES):
            raise UserError(
                f"teacher path '{name_or_path}' does not exist; pass an existing model directory "
                "or a Hugging Face hub name with teacher.name_or_path=..."
            )
    try:
        return AutoConfig.from_pretrained(
            os.path.expanduser(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load teacher '{name_or_path}' ({first}); check the name, run once with hub "
            "access to cache it, or pass a local directory with teacher.name_or_path=..."
        ) from err


def teacher_dtype(setting: str, precision: str) -> torch.dtype:
    """The teacher's weight dtype: `auto` follows the training precision."""
    if setting != "auto":
        if setting not in ("float32", "bfloat16", "float16"):
            raise UserError(
                f"unknown teacher.dtype '{setting}'; use auto, float32, bfloat16 or float16"
            )
        return getattr(torch, setting)
    if precision.startswith("bf16") or (
        precision.startswith("16") and not torch.cuda.is_available()
    ):
        return torch.bfloat16  # Lightning runs 16-mixed as bf16 on CPU
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def build_teacher(
    name_or_path: str,
    layer: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    precision: str = "32",
) -> Teacher:
    """The `teacher` config group's builder: `load_teacher` with `dtype` resolved against the
    run's (resolved) `precision`."""
    return load_teacher(name_or_path, layer, revision, trust_remote_code,
                        teacher_dtype(dtype, precision))  # fmt: skip


def load_teacher(
    name_or_path: str,
    layer: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Teacher:
    """Load `name_or_path` frozen and in eval mode, keeping layers 1..`layer` (None: all)."""
    config = _load_config(name_or_path, revision, trust_remote_code)
    total = config.num_hidden_layers
    layer = total if layer is None else int(layer)
    if not 1 <= layer <= total:
        raise UserError(
            f"teacher layer {layer} is outside 1..{total} of '{name_or_path}'; "
            f"set teacher.layer between 1 and {total} (or null for the last layer)"
        )
    truncated = copy.deepcopy(config)
    truncated.num_hidden_layers = layer  # layers above the distilled one are never built
    with quiet_transformers():  # the dropped layers would be reported as unexpected keys
        model = AutoModel.from_pretrained(
            os.path.expanduser(name_or_path),
            config=truncated,
            revision=revision,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
            dtype=dtype,
            add_pooling_layer=False,
        )
    self_attention(encoder_layers(model)[layer - 1])  # fail fast on non-BERT-style encoders
    model.eval().requires_grad_(False)
    return Teacher(name_or_path=name_or_path, config=config, layer=layer, model=model)
