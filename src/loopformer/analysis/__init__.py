"""Looking inside the loop: trajectories, convergence, path independence, PCA, logit lens, exit statistics."""
