"""A bridge transfer that never completes ends in an error, not a hang (tests/test_disaggregated.py).

One training rank and one rollout rank (roles as a disaggregated run starts them), rollout.bridge_timeout_s=2.
The training rank waits to receive an object the rollout rank never sends (it stays alive and beating until
the training rank is done): the receive must fail after the bridge timeout, and the error must name the
rollout rank. The training rank prints BRIDGE_TIMEOUT_OK <seconds> <message>.
"""

import time

import torch

from megatron_pz.config import RuntimeConfig
from megatron_pz.disagg.bridge import connect_rollout_side, connect_training_side
from megatron_pz.rollout.config import RolloutConfig
from megatron_pz.disagg.roles import RankLost, start_roles


def main():
    cfg = RolloutConfig(engine="hf", placement="disaggregated", ranks=1, heartbeat_timeout_s=3, bridge_timeout_s=2)
    roles = start_roles(cfg, RuntimeConfig(device="cpu"))
    device = torch.device("cpu")
    if roles.is_trainer:
        group = connect_training_side(roles, 0, cfg.bridge_timeout_s, device)
        start = time.monotonic()
        try:
            group.recv_object(1)
        except RankLost as error:
            print(f"BRIDGE_TIMEOUT_OK {time.monotonic() - start:.1f} {error}", flush=True)
        roles.store.add("test/done", 1)
    else:
        groups = connect_rollout_side(roles, 1, cfg.bridge_timeout_s, device)  # kept: closing them ends the pairs
        roles.liveness.wait_for_count("test/done", 1, [roles.trainer_peer(0)])  # alive, beating, never sending
        del groups
    roles.close()


if __name__ == "__main__":
    main()
