"""nnbackprop: multilayer perceptrons and convolutional networks with hand-written backpropagation on torch tensors.

Every op is a forward/backward pair (:mod:`nnbackprop.functional`) wrapped as a module with a ``torch.nn``-shaped API
(:mod:`nnbackprop.module`, :mod:`nnbackprop.layers`, :mod:`nnbackprop.conv`; initial values from
:mod:`nnbackprop.init`); :mod:`nnbackprop.gradcheck` proves each gradient against ``torch.autograd``; :func:`train` fits
a model with the same code, laid out for speed (:mod:`nnbackprop.step`).
"""

from nnbackprop import init
from nnbackprop.config import TrainConfig
from nnbackprop.conv import AdaptiveAvgPool2d, AvgPool2d, Conv2d, MaxPool2d
from nnbackprop.gradcheck import GradCheckReport, check_gradients, check_gradients_fd
from nnbackprop.layers import GELU, BatchNorm1d, BatchNorm2d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.model import Sequential, cnn, mlp, to_torch
from nnbackprop.module import Module, Parameter
from nnbackprop.optim import SGD, Adam, AdamW
from nnbackprop.step import FastStep, SimpleStep, make_step
from nnbackprop.callbacks import TrainCallback, TrainResult
from nnbackprop.training import train

__version__ = "0.2.0"

__all__ = [
    "Adam", "AdamW", "AdaptiveAvgPool2d", "AvgPool2d", "BCEWithLogitsLoss", "BatchNorm1d", "BatchNorm2d", "Conv2d",
    "CrossEntropyLoss", "Dropout", "FastStep", "Flatten", "GELU", "GradCheckReport", "LeakyReLU", "Linear", "Loss",
    "MSELoss", "MaxPool2d", "Module", "Parameter", "ReLU", "SGD", "Sequential", "Sigmoid", "SimpleStep", "Tanh",
    "TrainCallback", "TrainConfig", "TrainResult", "check_gradients", "check_gradients_fd", "cnn", "init", "make_step",
    "mlp", "to_torch", "train",
]
