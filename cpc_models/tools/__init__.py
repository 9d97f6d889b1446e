"""Command-line helpers that are not part of training or evaluation (``python -m cpc_models.tools.<name>``)."""
