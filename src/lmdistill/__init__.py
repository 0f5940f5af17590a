"""lmdistill: task-agnostic distillation of BERT-family encoders."""

__version__ = "0.1.0"

# Registers the MiniMoE student classes (model type "lmdistill-minimoe") with transformers'
# AutoConfig / AutoModel / AutoModelForSequenceClassification, so exported MoE students load
# with `AutoModel.from_pretrained` after `import lmdistill`.
from lmdistill.models import moe as _moe  # noqa: E402, F401
from lmdistill.models import ofa_model as _ofa  # noqa: E402, F401  (model type "lmdistill-ofa")
from lmdistill.models import sparse as _sparse  # noqa: E402, F401  (model type "lmdistill-sparse")
