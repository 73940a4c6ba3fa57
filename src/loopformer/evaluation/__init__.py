"""Evaluation of trained looped models: validation loss and perplexity as a function of depth."""
