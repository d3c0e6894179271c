"""Pruning-ready models: self-distil an LLM under randomly sampled sparsity plans (``experiments.prepare``).

A small model tolerates little pruning as trained: skipping one of SmolLM2-135M's 30 layers already
changes a fifth of its next-token predictions. The methods that report large input-adaptive savings
(LayerSkip, D-LLM, Router-Tuning, FlexiDepth) first adapt the model to the sub-networks it will
run. This package does the same for PruneGym's own plan space:

- :class:`~envs.distill.config.PlanDistribution` / :class:`~envs.distill.sampler.PlanSampler` draw
  plans the agent can choose: layer dropout whose rate rises with depth (LayerSkip), optionally
  aimed at the least important layers (the ones static and action plans skip); MLP-channel keep
  levels; whole-KV-group drops. With a single weight set (``dense_weights="adapted"``) a share of
  steps runs the dense plan so that the dense path stays anchored to the original model.
- Each step runs the sampled plan *with gradients* through :class:`~envs.runtime.sparse_lm.SparseLM`
  built with ``strategy="gather"`` (its kept rows are gathered from the real parameters, so
  gradients reach them) and minimises ``KL(teacher || student)`` over the logits, where the teacher
  is the original dense model; an optional language-model loss is added.
- Choice distillation (``choice_weight``): on multiple-choice items of the train split, the pruned
  student matches the dense model's softmax over the summed log-likelihoods of the choices, which
  is exactly what the task scorer ranks (:func:`~envs.distill.losses.choice_kl`,
  :func:`~envs.distill.losses.choice_scores`). It can run beside the token KL or alone (``kl_weight=0``).
- ``method="full"`` fine-tunes the decoder layers; ``method="lora"`` trains low-rank deltas that
  are added to the extracted weights on the fly (:class:`~envs.distill.lora.LowRankDeltas`) and
  merged at the end.
- ``dense_weights="original"`` (the default) keeps the original weights for the dense plan and
  trains the deltas into a second weight set that pruned layers run with
  (:meth:`~envs.runtime.sparse_lm.SparseLM.set_adapted`): from the first layer a plan prunes, the
  adapted weights take over, in training as at run time. The dense model is then exactly the
  original one, whatever the training text. ``"adapted"`` merges the deltas into the one weight set
  that every plan runs, and relies on the dense share of the steps to keep the dense path close.
- Training is bounded in time and steps, checkpointed (safetensors + JSON, no pickle) so that a kill
  at any point resumes from the newest complete checkpoint; everything random is a function of
  ``(seed, step)``, so a resumed run equals an uninterrupted one.

Modules, by what they do:

- :mod:`envs.distill.config`: :class:`PlanDistribution` and :class:`PrepareConfig` (validation, JSON).
- :mod:`envs.distill.sampler`: :class:`PlanSampler`, :func:`step_rng`, the held-out plan set.
- :mod:`envs.distill.data`: token sequences, the batch of each step, multiple-choice items.
- :mod:`envs.distill.losses`: token KL, choice scores and choice KL, the language-model loss.
- :mod:`envs.distill.lora`: :class:`LowRankDeltas`.
- :mod:`envs.distill.evaluation`: the before/after figures against the original dense model.
- :mod:`envs.distill.checkpoints`: kill-safe checkpoints for ``resume=true``.
- :mod:`envs.distill.training`: :func:`prepare_model` and :func:`write_prepared` (the folder
  :func:`envs.runtime.models.load_model` loads by name, written atomically).

Imports the runtime and the tasks, never the environments; nothing here knows about Hydra:
``experiments.prepare`` is the entry point.
"""
