"""agentrl's learner: trajectories from the bus in, new policy weights out.

Modules, one job each: :mod:`~trainer.batching` (groups, staleness, filters, dedupe), :mod:`~trainer.advantages`,
:mod:`~trainer.losses`, :mod:`~trainer.packing` (padding-free micro-batches), :mod:`~trainer.backend` (the
``TrainBackend`` interface and the torch backend), :mod:`~trainer.weights`, :mod:`~trainer.checkpoint`,
:mod:`~trainer.metrics`, :mod:`~trainer.learner` (the main loop), :mod:`~trainer.sft` (warm-up),
:mod:`~trainer.bus_adapter` and :mod:`~trainer.main` (wiring for ``agentrl learner``).

Extension points, named in config by dotted path:

=============================  ==================================================  ======================================
config key                     signature                                           built in
=============================  ==================================================  ======================================
``learner.advantage``          ``(rewards [N], group_index [N]) -> advantages [N]``  ``trainer.advantages.grpo``, ``dr_grpo``,
                                                                                   ``rloo``, ``reinforce_pp_baseline``
``learner.loss.fn``            ``(LossInputs, LossConfig) -> LossOutput``            ``trainer.losses.ppo_loss``, ``sft_loss``
``learner.batch.group_filter`` ``(Sequence[Trajectory]) -> bool`` (keep?)            ``trainer.batching.keep_all``,
                                                                                   ``drop_zero_variance``
=============================  ==================================================  ======================================
"""
