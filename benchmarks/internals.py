"""The benchmarks' only imports of nnbackprop internals; everything else they use is public (``import nnbackprop as
nb``). When the library moves one of these, repoint it here and nowhere else.
"""

from nnbackprop.diagnostics import Diagnostics
from nnbackprop.distributed import (DistContext, all_reduce_mean_hook, broadcast_module, cleanup, init_distributed,
                                    local_batch_size)
from nnbackprop.files import WriteError, write_text
from nnbackprop.gradcheck import TOLERANCES
from nnbackprop.model import model_from_file
from nnbackprop.training import build_loss, build_model, build_optimizer, build_scheduler, train_epoch

__all__ = [
    "TOLERANCES", "Diagnostics", "DistContext", "WriteError", "all_reduce_mean_hook", "broadcast_module",
    "build_loss", "build_model", "build_optimizer", "build_scheduler", "cleanup", "init_distributed",
    "local_batch_size", "model_from_file", "train_epoch", "write_text",
]
