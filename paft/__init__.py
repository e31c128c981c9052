"""PAFT: parallel fine-tuning (SFT ‖ preference alignment, merged) and the REC evaluator."""

__version__ = "0.1.0"
