"""The benchmarks' only imports of nnbackprop internals; everything else they use is public (``import nnbackprop as
nb``). When the library moves one of these, repoint it here and nowhere else.
"""

from nnbackprop.diagnostics import Diagnostics
from nnbackprop.distributed import (DistContext, all_reduce_mean_hook, broadcast_module, cleanup, init_distributed,
                                    local_batch_size)
from nnbackprop.errors import ConfigError, NNBackpropError
from nnbackprop.export import checked_torch_model
from nnbackprop.files import WriteError, write_text
from nnbackprop.layout import LOW_PRECISION
from nnbackprop.step import full_float32, tf32
from nnbackprop.build import build_loss, build_model, build_optimizer, build_scheduler, resolved
from nnbackprop.training import Run, train_epoch
from nnbackprop.user_model import model_from_file

__all__ = [
    "all_reduce_mean_hook", "broadcast_module", "build_loss", "build_model", "build_optimizer",
    "build_scheduler", "checked_torch_model", "cleanup", "ConfigError", "Diagnostics", "DistContext", "full_float32",
    "init_distributed", "local_batch_size", "LOW_PRECISION", "model_from_file", "NNBackpropError", "resolved", "Run",
    "tf32", "train_epoch", "write_text", "WriteError",
]
