"""nnbackprop: a multilayer perceptron with hand-written backpropagation on torch tensors.

Every op is a forward/backward pair (:mod:`nnbackprop.functional`) wrapped as a module with a ``torch.nn``-shaped API
(:mod:`nnbackprop.module`, :mod:`nnbackprop.layers`); :mod:`nnbackprop.gradcheck` proves each gradient against
``torch.autograd``; :func:`train` fits a model with the same code, laid out for speed (:mod:`nnbackprop.step`).
"""

from nnbackprop.config import TrainConfig
from nnbackprop.gradcheck import GradCheckReport, check_gradients, check_gradients_fd
from nnbackprop.layers import GELU, BatchNorm1d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.model import Sequential, mlp, to_torch
from nnbackprop.module import Module, Parameter
from nnbackprop.optim import SGD, Adam, AdamW
from nnbackprop.step import FastStep, SimpleStep, make_step
from nnbackprop.callbacks import TrainCallback, TrainResult
from nnbackprop.training import train

__version__ = "0.2.0"

__all__ = [
    "Adam", "AdamW", "BCEWithLogitsLoss", "BatchNorm1d", "CrossEntropyLoss", "Dropout", "FastStep", "Flatten", "GELU",
    "GradCheckReport", "LeakyReLU", "Linear", "Loss", "MSELoss", "Module", "Parameter", "ReLU", "SGD", "Sequential",
    "Sigmoid", "SimpleStep", "Tanh", "TrainCallback", "TrainConfig", "TrainResult", "check_gradients",
    "check_gradients_fd", "make_step", "mlp", "to_torch", "train",
]
