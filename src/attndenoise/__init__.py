"""attndenoise: make pretrained language models attend to the relevant part of a noisy context.

Public API (see README.md): ``METHODS``, ``config_for``, ``apply``, ``remove``, ``merge``, ``save``, ``load``,
``save_pretrained`` / ``from_pretrained`` (whole patched models), ``push_to_hub``, ``set_trainable``,
``step``, ``LambdaCallback``, ``reference_mode``, ``disabled``, ``trainable_parameters`` /
``print_trainable_parameters``, ``train``, ``TrainConfig``, ``load_trained``,
``evaluate_model`` (and the per-task ``evaluate_*``), ``dataset_attention`` (attention to gold and noise per layer:
docs/methods.md, section Attention measures); the command line is
:mod:`attndenoise.cli`, the demo :mod:`attndenoise.demo`.
"""

from . import methods as _methods  # noqa: F401  (registers every method)
from .config import ConfigError, MethodConfig
from .evaluate import (
    EvalResults,
    evaluate_model,
    evaluate_needle,
    evaluate_noisy_qa,
    evaluate_perplexity,
    read_results,
    write_results,
)
from .families import SUPPORTED as SUPPORTED_FAMILIES
from .families import UnsupportedModelError
from .hub import from_pretrained, push_to_hub, save_pretrained
from .io import AdapterLoadError, load, save
from .measures import AttentionMeasures, dataset_attention, example_attention, measure_attention
from .methods.base import NotMergeableError
from .methods.daa import DAAConfig
from .methods.dex import DEXConfig
from .methods.diff import DIFFConfig
from .methods.diffqkv import DiffKConfig, DiffQConfig, DiffVConfig
from .methods.dint import DINTConfig, LowRankDINTConfig
from .methods.opamp import OpAmpConfig
from .methods.opamp_checkpoint import load_opamp_checkpoint
from .methods.sra import SRAConfig
from .patch import (
    AlreadyAppliedError,
    MethodDroppedWarning,
    MethodFrozenError,
    NotAppliedError,
    apply,
    disabled,
    merge,
    method_modules,
    reference_mode,
    remove,
    set_trainable,
)
from .registry import METHODS, config_for
from .schedule import current_lambdas, set_step, step
from .summary import TrainableParameters, print_trainable_parameters, trainable_parameters
from .train import TrainConfig, TrainError, load_trained, train
from .wrappers import ShardedModelError

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LambdaCallback subclasses transformers' TrainerCallback, whose import pulls in peft, accelerate and datasets
    # (seconds): it is loaded on first use, so `import attndenoise` does not pay for it.
    if name == "LambdaCallback":
        from .hf_trainer import LambdaCallback

        return LambdaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "METHODS", "config_for", "apply", "remove", "merge", "save", "load", "step", "set_step", "current_lambdas",
    "LambdaCallback", "reference_mode", "method_modules", "MethodConfig", "DAAConfig", "DEXConfig", "DiffQConfig",
    "DiffKConfig", "DiffVConfig", "ConfigError", "AdapterLoadError", "NotMergeableError", "UnsupportedModelError",
    "AlreadyAppliedError", "NotAppliedError", "SUPPORTED_FAMILIES", "__version__",
    "DIFFConfig", "DINTConfig", "LowRankDINTConfig", "SRAConfig",
    "OpAmpConfig", "load_opamp_checkpoint",
    "save_pretrained", "from_pretrained", "push_to_hub", "set_trainable", "MethodFrozenError", "MethodDroppedWarning",
    "ShardedModelError", "disabled", "trainable_parameters", "print_trainable_parameters", "TrainableParameters",
    "train", "TrainConfig", "TrainError", "load_trained",
    "evaluate_model", "evaluate_noisy_qa", "evaluate_needle", "evaluate_perplexity", "EvalResults", "write_results",
    "read_results", "AttentionMeasures", "measure_attention", "example_attention", "dataset_attention",
]
