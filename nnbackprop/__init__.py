"""nnbackprop: a multilayer perceptron with hand-written backpropagation on torch tensors.

Every layer is a forward/backward pair (:mod:`nnbackprop.functional`) wrapped as a module with a ``torch.nn``-shaped
API (:mod:`nnbackprop.module`, :mod:`nnbackprop.layers`); :mod:`nnbackprop.gradcheck` proves each gradient against
``torch.autograd``.
"""

from nnbackprop.gradcheck import GradCheckReport, check_gradients, check_gradients_fd
from nnbackprop.layers import GELU, BatchNorm1d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.model import Sequential, mlp, to_torch
from nnbackprop.module import Module, Parameter
from nnbackprop.optim import SGD

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss", "BatchNorm1d", "CrossEntropyLoss", "Dropout", "Flatten", "GELU", "GradCheckReport",
    "LeakyReLU", "Linear", "Loss", "MSELoss", "Module", "Parameter", "ReLU", "SGD", "Sequential", "Sigmoid", "Tanh",
    "check_gradients", "check_gradients_fd", "mlp", "to_torch",
]
