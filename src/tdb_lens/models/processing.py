"""Former name of `tdb_lens.models.gpt2_processing` (GPT-2's opt-in weight processing); kept importable."""

from .gpt2_processing import PROCESSING_FLAGS, process_weights_

__all__ = ["PROCESSING_FLAGS", "process_weights_"]
