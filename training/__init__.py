"""DeepSpeed training of the pipeline's models: configs, launcher, trainers, evaluation, promotion."""
