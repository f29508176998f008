"""Student training: losses, learner group, checkpoints, weight export, embedded default builder."""
