"""Training: SNLI fine-tuning and WikiText-2 pretraining (library functions behind
``python -m fastbert finetune|pretrain``)."""
from .common import RunConfig
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain

__all__ = ["RunConfig", "FinetuneConfig", "finetune", "PretrainConfig", "pretrain"]
