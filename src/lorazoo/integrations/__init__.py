"""Bridges from lorazoo adapters to other training frameworks (``lorazoo.integrations.hf``: the
Hugging Face ``transformers.Trainer`` and ``accelerate launch``)."""
