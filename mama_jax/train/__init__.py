"""The training side: the one loop, the pretraining step and job, train state, checkpoints,
optimiser, sharding, training logs and exact micro-batching (GradCache)."""
