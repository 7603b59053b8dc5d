"""Every error nnbackprop raises for a person to read, and how it is worded: one line, beginning with
:data:`ERROR_PREFIX`.

Each class derives from :class:`NNBackpropError`, which the command line catches (printing the one line and exiting
with status 2, or 1 for :class:`NonFiniteLossError`), and from the built-in exception a Python caller would expect
(``ValueError`` for bad settings, ``FileNotFoundError`` for missing data, ``OSError`` for a failed write, ...), so
``except ValueError`` keeps working. A layer refusing its input (wrong shape, dtype or device) raises a plain
``ValueError``, as torch does.
"""

from __future__ import annotations

from typing import Any

ERROR_PREFIX = "nnbackprop: error: "
"""How every error line of the command line and the scripts begins."""


class NNBackpropError(Exception):
    """Base of nnbackprop's errors: the message is one line that names the problem and the fix."""


class ConfigError(NNBackpropError, ValueError):
    """Settings that are invalid, contradict each other or cannot fit the data, model or machine."""


class DataError(NNBackpropError, ValueError):
    """A data file that cannot be read as what it claims to be (truncated, corrupt, too large); the message names it."""


class DatasetNotFoundError(NNBackpropError, FileNotFoundError):
    """A data set is in none of the searched places; the message lists them and how to get the data."""


class MissingFileError(NNBackpropError, FileNotFoundError):
    """A file named on the command line (a checkpoint, an image, a model file) does not exist."""


class CheckpointError(NNBackpropError, ValueError):
    """A checkpoint is unreadable, corrupt, not a checkpoint, or does not match the run; the message names the file."""


class OutputExistsError(NNBackpropError, FileExistsError):
    """The output folder already holds a run, and neither resuming nor overwriting it was asked for."""


class WriteError(NNBackpropError, OSError):
    """A file could not be written; the message names it, the cause and what to do."""


class OutputLockedError(WriteError):
    """Another process is training into the same output folder (it holds its lock); the message names its pid."""


class MissingExtraError(NNBackpropError, ModuleNotFoundError):
    """An optional dependency (matplotlib, tensorboard, onnx) is needed and not installed; the message says how to."""


class ReferenceForwardError(NNBackpropError, ValueError):
    """The gradient checker cannot differentiate a module's forward with autograd: write its ``reference_forward``."""


class BackwardError(NNBackpropError, RuntimeError):
    """A layer's backward broke the module contract: it left a parameter without a gradient, or assigned one instead
    of accumulating it; the message names the parameter and the call to make."""


class CudaGraphError(NNBackpropError, RuntimeError):
    """Capturing a training step as a CUDA graph failed in a way that left CUDA unusable in this process."""


class NonFiniteLossError(NNBackpropError, RuntimeError):
    """Training diverged: the loss (or the weights) became NaN or infinite.

    Attributes:
        epoch: the epoch it happened in; first_step, last_step: the range of steps (1-based, of ``num_steps`` in the
            epoch) it happened in; checkpoint: the last good checkpoint, untouched (``None`` if none was written);
            last_good_epoch: the epoch that checkpoint holds (0: none).
    """

    def __init__(self, what: str, epoch: int, first_step: int, last_step: int, num_steps: int,
                 checkpoint: Any, last_good_epoch: int) -> None:
        self.epoch, self.first_step, self.last_step = epoch, first_step, last_step
        self.checkpoint, self.last_good_epoch = checkpoint, last_good_epoch
        steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
        kept = (f"the last good checkpoint, {checkpoint} (epoch {last_good_epoch}), was kept" if checkpoint and
                last_good_epoch else "no checkpoint was written")
        super().__init__(f"{what} became non-finite in epoch {epoch}, {steps} of {num_steps}; training stopped and "
                         f"{kept}")


class DistributedError(NNBackpropError, RuntimeError):
    """A data-parallel run cannot start or go on: no such device, a process group that does not form, a rank that
    died or stopped answering. The message names this rank, the world size and what to do."""


def one_line(message: Any) -> str:
    """A multi-line message joined into one line (a line ending in ``:`` introduces the next ones)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    for previous, line in zip(lines, lines[1:]):
        text += (" " if previous.endswith(":") else "; ") + line
    return text


def gist(error: BaseException) -> str:
    """``Type: first line`` of an error raised by code we do not control (torch, a user's file), without a final
    full stop."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(error).__name__
