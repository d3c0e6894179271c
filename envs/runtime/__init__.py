"""The model runtime: loading, sparsity plans, the sliced executor, importance orderings and 2:4 weights.

Nothing here knows about environments, gymnasium, Ray or Hydra; a deployed controller needs only
this sub-package (and :mod:`envs.observation` / :mod:`envs.action` for what it sees and does).

| module | holds |
| --- | --- |
| :mod:`~envs.runtime.models` | loading causal LMs offline (the embedded SmolLM2, folders, hub ids, tiny test models) |
| :mod:`~envs.runtime.plan` | :class:`ModelSpec`, :class:`LayerPlan`, :class:`SparsityPlan`, keep fractions → plan |
| :mod:`~envs.runtime.importance` | importance orderings and their calibration |
| :mod:`~envs.runtime.sparse_lm` | :class:`SparseLM`, the executor that slices weights per plan |
| :mod:`~envs.runtime.semistructured` | 2:4 semi-structured sparse weights (NVIDIA GPUs) |
"""
