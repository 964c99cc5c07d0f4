"""Drop-in reward adapters, one module per trainer; each imports its trainer only when used.

* `trl`: `StepCreditReward`, a `GRPOTrainer` reward function.
* `verl`: `compute_score`, an async `custom_reward_function`.
* `verl_manager`: `StepCreditRewardManager`, per-step gains on their tokens (needs verl and torch).
* `openrlhf`: a `reward_func` file for `--reward.remote_url <file>.py`.
* `slime`: `reward_func` / `group_reward_func` for `--custom-rm-path`.

Import the module you need (`from stepcredit_client.adapters.trl import StepCreditReward`):
nothing is imported here, so no trainer package is ever required by another's adapter.
"""

__all__: list[str] = []
