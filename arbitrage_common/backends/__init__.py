"""Model backends behind the Generator / Scorer interfaces (torch is imported lazily)."""
from .checkpoints import CheckpointError, check_checkpoint_dir

__all__ = ["CheckpointError", "check_checkpoint_dir"]
