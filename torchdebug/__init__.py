"""torchdebug: debug training data while a model trains.

Add :class:`TrainingDynamics` to a Lightning ``Trainer`` to record per-sample training
dynamics, score every sample and flag likely mislabeled, hard and ambiguous ones; use
:class:`DynamicsRecorder` directly in any PyTorch loop.
"""

from torchdebug.actions import sample_weights, weighted_loss
from torchdebug.callback import TrainingDynamics
from torchdebug.grad_norms import per_sample_grad_norms
from torchdebug.recorder import DynamicsRecorder, SampleError
from torchdebug.report import load_history, load_report
from torchdebug.scores import REPORT_COLUMNS

__all__ = [
    "REPORT_COLUMNS",
    "DynamicsRecorder",
    "SampleError",
    "TrainingDynamics",
    "load_history",
    "load_report",
    "per_sample_grad_norms",
    "sample_weights",
    "weighted_loss",
]
__version__ = "0.1.0"
