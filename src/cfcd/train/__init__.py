"""Training: CFCD stage 1/2, DOLG and GeM baselines from versioned YAML recipes.

* :mod:`cfcd.train.config` -- recipes (``cfcd/configs/*.yaml``) read into typed dataclasses
  (:class:`~cfcd.train.config.TrainConfig`), ``key=value`` overrides;
* :mod:`cfcd.train.builders` -- the samplers and optimizers a recipe names, in
  :class:`~cfcd.utils.registry.Registry` tables (the LR schedules are in :mod:`cfcd.train.schedule`);
* :mod:`cfcd.train.trainer` -- :class:`~cfcd.train.trainer.Trainer` / :func:`~cfcd.train.trainer.train`:
  DDP through torchrun, gradient accumulation with exact global-batch MadaCos statistics,
  bf16 autocast and channels_last on CUDA, resumable checkpoints, JSONL/TensorBoard logs;
* :mod:`cfcd.train.schedule` -- the reference's cosine-with-warmup learning rate;
* :mod:`cfcd.train.checkpoint` -- atomic, ``weights_only`` checkpoints;
* :mod:`cfcd.train.confusions` -- ``landmark_scores.txt`` for hard-negative tuples.

Data lists, augmentation and samplers live in :mod:`cfcd.train.data` and :mod:`cfcd.train.samplers`.
Nothing heavy is imported here.
"""
