"""vllm-remote's pure routing: the batch planner and a server's cool-off."""

from __future__ import annotations

import random

import pytest

from stepcredit.backends.routing import CoolOff, common_prefix, plan_routes

SYSTEM = list(range(1000, 1300))  # a 300-token system prompt every item shares


def group(rng: random.Random, size: int, completion: tuple[int, int] = (200, 400)) -> list[list[int]]:
    """A GRPO group: one prompt (system prompt + question), `size` completions."""
    prompt = SYSTEM + [rng.randrange(5000, 6000) for _ in range(40)]
    return [prompt + [rng.randrange(6000, 9000) for _ in range(rng.randint(*completion))] for _ in range(size)]


def work(trunks: list[list[int]], extra: list[int], route: list[int], servers: int) -> list[int]:
    """Prompt tokens each server computes with a prefix cache: the trie of its trunks."""
    out = []
    for s in range(servers):
        mine = sorted(t for t, r in zip(trunks, route) if r == s)
        trie = sum(len(t) - (common_prefix(mine[i - 1], t) if i else 0) for i, t in enumerate(mine))
        out.append(trie + sum(e for e, r in zip(extra, route) if r == s))
    return out


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    long = list(range(300))
    assert common_prefix(long, long[:200] + [-1] + long[201:]) == 200
    assert common_prefix(long, list(long)) == 300


def test_a_shared_system_prompt_does_not_send_everything_to_one_server():
    # Today's rule hashed the first 256 tokens: with this prompt, one server got all.
    rng = random.Random(1)
    trunks = [t for _ in range(6) for t in group(rng, 4)]
    extra = [100] * len(trunks)
    route = plan_routes(trunks, extra, [0, 0, 0])
    loads = work(trunks, extra, route, 3)
    assert sorted(set(route)) == [0, 1, 2]
    assert max(loads) < 1.25 * sum(loads) / 3


def test_groups_stay_together_when_that_costs_no_balance():
    rng = random.Random(2)
    groups = [group(rng, 4, completion=(300, 300)) for _ in range(4)]
    trunks = [t for g in groups for t in g]
    route = plan_routes(trunks, [50] * len(trunks), [0, 0])
    per_group = [{route[4 * g + i] for i in range(4)} for g in range(4)]
    assert all(len(servers) == 1 for servers in per_group), per_group
    assert sorted(route.count(s) for s in (0, 1)) == [8, 8]


def test_a_group_is_split_when_keeping_it_would_unbalance_the_servers():
    # One group of 8 on 4 servers: keeping it together would leave 3 servers idle.
    trunks = group(random.Random(3), 8, completion=(300, 300))
    route = plan_routes(trunks, [50] * 8, [0, 0, 0, 0])
    assert sorted(route.count(s) for s in range(4)) == [2, 2, 2, 2]


def test_trajectories_that_differ_only_at_the_end_stay_on_one_server():
    # Splitting them would compute the long common prefix twice to save one token.
    prefix = list(range(1000))
    assert len(set(plan_routes([prefix + [1], prefix + [2]], [0, 0], [0, 0]))) == 1


def test_work_in_flight_elsewhere_steers_the_batch_to_idle_servers():
    rng = random.Random(4)
    trunks = [t for _ in range(2) for t in group(rng, 4)]
    batch_work = sum(work(trunks, [0] * 8, [0] * 8, 1))
    # Server 0 already holds more than this whole batch: everything goes elsewhere.
    route = plan_routes(trunks, [0] * 8, [2 * batch_work, 0, 0])
    assert 0 not in route and set(route) == {1, 2}
    # One trajectory goes to the least-loaded server; on ties the first listed.
    assert plan_routes(trunks[:1], [0], [500, 0, 300]) == [1]
    assert plan_routes(trunks[:1], [0], [0, 0, 0]) == [0]


def test_fewer_trajectories_than_servers_get_one_server_each():
    trunks = [[1, 2, 3] + [i] * 50 for i in range(3)]
    assert sorted(plan_routes(trunks, [10, 10, 10], [0] * 8)) == [0, 1, 2]


def test_the_plan_is_deterministic_and_follows_the_trajectories_not_their_order():
    rng = random.Random(5)
    trunks = [t for _ in range(5) for t in group(rng, 3)]
    extra = [rng.randrange(20, 200) for _ in trunks]
    route = plan_routes(trunks, extra, [0, 0, 0])
    assert plan_routes(trunks, extra, [0, 0, 0]) == route
    shuffled = list(range(len(trunks)))
    rng.shuffle(shuffled)
    again = plan_routes([trunks[i] for i in shuffled], [extra[i] for i in shuffled], [0, 0, 0])
    assert again == [route[i] for i in shuffled]


@pytest.mark.parametrize("seed", range(20))
def test_no_server_gets_much_more_than_its_share(seed):
    rng = random.Random(seed)
    servers = rng.randint(2, 6)
    trunks = [t for _ in range(rng.randint(1, 8)) for t in group(rng, rng.randint(1, 8), completion=(50, 2000))]
    extra = [rng.randrange(0, 300) for _ in trunks]
    loads = work(trunks, extra, plan_routes(trunks, extra, [0] * servers), servers)
    largest = max(len(t) + e for t, e in zip(trunks, extra))
    # Contiguous runs cut near each fair share: off by at most about one trajectory per cut.
    assert max(loads) <= sum(loads) / servers + 2 * largest


def test_plan_edge_cases():
    assert plan_routes([], [], [0]) == []
    assert plan_routes([[1], [2]], [0, 0], [0]) == [0, 0]
    assert plan_routes([[], []], [0, 0], [0, 0]) in ([0, 0], [0, 1], [1, 0], [1, 1])
    with pytest.raises(ValueError, match="no server"):
        plan_routes([[1]], [0], [])
    with pytest.raises(ValueError, match="extra"):
        plan_routes([[1]], [], [0])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cool_off_sets_a_server_aside_then_lets_one_trial_through():
    clock = FakeClock()
    health = CoolOff(30.0, clock)
    assert health.admit() == "go" and health.available
    health.failed("ConnectError: refused")
    assert health.admit() == "no" and not health.available and not health.up
    assert "ConnectError: refused" in health.describe() and "30 s" in health.describe()
    clock.now += 29.9
    assert health.admit() == "no"
    clock.now += 0.2
    assert health.available
    assert health.admit() == "trial"
    assert health.admit() == "wait"  # one trial at a time
    health.trial_passed()
    assert health.up and health.admit() == "go"


def test_a_failed_trial_starts_a_new_cool_off_and_an_abandoned_one_is_retried():
    clock = FakeClock()
    health = CoolOff(10.0, clock)
    health.failed("timed out")
    clock.now += 10
    assert health.admit() == "trial"
    health.failed("timed out again", trial=True)
    assert health.admit() == "no" and "again" in health.describe()
    clock.now += 10
    assert health.admit() == "trial"
    health.trial_abandoned()
    assert health.admit() == "trial"
    with pytest.raises(ValueError):
        CoolOff(0)


def test_a_late_failure_of_a_request_sent_before_the_trial_leaves_the_trial_alone():
    clock = FakeClock()
    health = CoolOff(10.0, clock)
    health.failed("timed out")
    clock.now += 10
    assert health.admit() == "trial"
    health.failed("an old request timed out late")  # not the trial: says nothing new
    assert health.admit() == "wait"  # still one trial, and only one
    clock.now += 15
    assert health.admit() == "wait"
    health.trial_passed()
    assert health.up
