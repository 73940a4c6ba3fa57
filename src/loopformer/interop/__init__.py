"""Interoperability: Huginn-0125 checkpoints, Hugging Face transformers (optional extra ``[hf]``)."""
