"""Rollouts on ranks of their own (``rollout.placement: disaggregated``): two roles in one torchrun job.

The job's last ``rollout.ranks`` ranks generate, the others train (:mod:`.roles`: the split, each role's own
default world, the heartbeat that names a dead peer). The training ranks' stage heads and the rollout ranks
talk over the bridge (:mod:`.bridge`: weights out stage by stage, pickled messages both ways) in the protocol of
:mod:`.protocol` (messages, and how a step's passages are cut into units). A rollout rank runs :mod:`.server`
for the whole run; the training ranks drive it with :mod:`.client` (the client and the one-step schedule).

The RL loop itself is the colocated one (:mod:`megatron_pz.train.trainer`): this package feeds it through
:class:`megatron_pz.train.disaggregated.DisaggregatedSource`. The objective is cut into a rollout half and a
scoring half in :mod:`megatron_pz.objectives.split`.
"""
