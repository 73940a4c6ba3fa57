"""Small neural-network modules, each tested alone: norm, RoPE, attention, MLP, layer, injection, loop signals."""
