"""Training: SNLI fine-tuning and WikiText-2 pretraining (library functions behind
``python -m fastbert finetune|pretrain``), and using a run afterwards (``load_run``,
``classify``, ``evaluate_run``: ``python -m fastbert evaluate|predict|export``)."""
from .common import RunConfig
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain
from .use import Run, RunError, classify, evaluate_run, load_run

__all__ = ["RunConfig", "FinetuneConfig", "finetune", "PretrainConfig", "pretrain",
           "Run", "RunError", "load_run", "classify", "evaluate_run"]
