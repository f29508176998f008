"""Model and data builders, run before a recipe (never from inside one): the embedded default's
tiny models and task (build.embedded), SmolLM2 from its GGUF wheel with a pruned student
(build.smollm2, build.pretrained)."""
