"""StepCredit: process (MIG) and outcome rewards for RL on multi-step reasoning."""

from .config import Settings
from .engine import ScoreBatch, Scorer
from .protocol import ScoreItem, ScoreRequest, ScoreResponse, ScoreResult, StepResult

__all__ = [
    "Settings",
    "Scorer",
    "ScoreBatch",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoreResult",
    "StepResult",
]
__version__ = "0.1.0"
