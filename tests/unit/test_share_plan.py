"""Which segments of a batch compute a common prefix once (hf packed)."""

from __future__ import annotations

from stepcredit.backends.packing import Segment, share_plan


def segment(traj: int, ids: list[int], first_scored: int) -> Segment:
    seg = Segment(traj=traj)
    for i, token in enumerate(ids):
        seg.push(token, i, i, i + 1, -1, -1)
    for i in range(first_scored, len(ids) - 1):
        seg.score(i, ids[i + 1], (traj, 0, 0))
    return seg


def test_segments_with_a_long_common_prefix_share_it_and_others_stay_alone():
    prompt = list(range(100, 180))
    a = segment(0, prompt + [1, 2, 3, 4], 80)
    b = segment(1, prompt + [5, 6, 7], 80)
    c = segment(2, prompt[:10] + [9] * 80, 85)  # shares 10 tokens only
    plan = share_plan([a, b, c], min_tokens=32)
    shared = [(n, {s.traj for s in members}) for n, members in plan if n]
    alone = [s.traj for n, members in plan if not n for s in members]
    assert shared == [(80, {0, 1})]
    assert alone == [2]


def test_the_shared_part_stops_before_the_first_scored_row():
    prompt = list(range(100, 200))
    a = segment(0, prompt + [1, 2], 60)  # its row 60 predicts a scored token
    b = segment(1, prompt + [3, 4], 90)
    (n, members), = [(n, m) for n, m in share_plan([a, b], min_tokens=8) if n]
    assert n == 60 and len(members) == 2


def test_a_prefix_shorter_than_the_threshold_is_not_worth_a_pass():
    prompt = list(range(100, 120))
    plan = share_plan([segment(0, prompt + [1] * 40, 30), segment(1, prompt + [2] * 40, 30)], min_tokens=32)
    assert all(n == 0 for n, _ in plan)


def test_groups_beat_one_big_cluster_on_a_shorter_common_prefix():
    system = list(range(1000, 1040))
    q1, q2 = list(range(2000, 2060)), list(range(3000, 3060))
    segs = [segment(t, system + q + [t] * 30, 100) for t, q in enumerate([q1, q1, q1, q2, q2, q2])]
    plan = sorted((n, sorted(s.traj for s in members)) for n, members in share_plan(segs, min_tokens=32) if n)
    assert plan == [(100, [0, 1, 2]), (100, [3, 4, 5])]
