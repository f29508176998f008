"""Student training: the DeepSpeed learner and its group, losses, checkpoints, the LR schedule, exact transformers references."""
