"""Making a model pruning-ready: self-distillation under sampled sparsity plans (``experiments.prepare``).

Imports the runtime and the tasks, never the environments.
"""
