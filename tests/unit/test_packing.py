"""The hf backend's planner: pure Python, no torch, unit-tested without a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stepcredit.backends.packing import (
    PackingRule,
    forward_groups,
    packed_segments,
    per_prefix_segments,
    plan_batch,
)
from stepcredit.probes import TrajectoryProbes

BUDGETS = dict(max_tokens=4096, max_logit_rows=2048, max_rows=64, max_padding=0.2)


def traj(prompt_len: int, length: int, cuts: list[int], refs=((7,), (8, 9))) -> TrajectoryProbes:
    trunk = list(range(1000, 1000 + prompt_len)) + list(range(5000, 5000 + length))
    return TrajectoryProbes(trunk=trunk, contexts=[trunk[:c] + [3, 4] for c in cuts], references=[list(r) for r in refs])


def test_the_planner_imports_no_torch():
    code = "import sys, stepcredit.backends.packing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_packed_segment_holds_the_trunk_once_and_one_branch_per_probe_and_reference():
    t = traj(4, 6, [4, 7, 10])
    (seg,) = packed_segments(0, t, max_tokens=4096, max_rows=2048)
    # trunk 10 + per probe (2 prefix tokens + 3 reference tokens) x 3 probes
    assert len(seg.ids) == 10 + 3 * (2 + 3)
    assert seg.ids[:10] == t.trunk
    # Every target: (k, v) for k in probes, each reference token once.
    assert sorted(set(seg.owners)) == [(0, k, v) for k in range(3) for v in range(2)]
    assert len(seg.targets) == 3 * 3
    # A branch's positions continue from its cut, not from the row.
    first_branch = seg.trunk.index(-1)
    assert seg.positions[first_branch] == 4 and seg.limit[first_branch] == 4


def test_packed_segments_split_when_the_scored_rows_exceed_the_budget():
    t = traj(4, 20, list(range(4, 25, 2)))
    segments = packed_segments(0, t, max_tokens=4096, max_rows=6)
    assert len(segments) > 1
    assert sorted(o for s in segments for o in set(s.owners)) == [(0, k, v) for k in range(11) for v in range(2)]
    assert all(len(set(s.sources)) <= 6 for s in segments)


def test_per_prefix_segments_are_plain_causal_sequences():
    t = traj(2, 3, [2, 5])
    segments = per_prefix_segments(0, t)
    assert len(segments) == 2 * 2
    for seg in segments:
        assert seg.positions == list(range(len(seg.ids)))
        assert seg.trunk == list(range(len(seg.ids))) and seg.limit == [i + 1 for i in range(len(seg.ids))]


def test_forward_groups_respect_every_budget_and_keep_lengths_close():
    t = [traj(4, n, [4, 4 + n]) for n in (10, 11, 12, 60)]
    segments = [s for i, tr in enumerate(t) for s in per_prefix_segments(i, tr)]
    groups = forward_groups(segments, max_tokens=4096, max_logit_rows=2048, max_rows=3, max_padding=0.2)
    assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in segments)
    for group in groups:
        assert len(group) <= 3
        width = max(len(s.ids) for s in group)
        padding = sum(width - len(s.ids) for s in group)
        assert padding <= 0.2 * width * len(group)


def test_a_probe_without_context_fails_only_its_trajectory():
    empty = TrajectoryProbes(trunk=[], contexts=[[]], references=[[5]])
    plan = plan_batch([traj(4, 4, [4, 8]), empty], strategy="per-prefix", share_min_tokens=0, **BUDGETS)
    assert list(plan.failed) == [1]
    assert {s.traj for p in plan.passes for g in p.groups for s in g} == {0}


@pytest.mark.parametrize(
    "rule,long_packed",
    [(PackingRule(), True), (PackingRule(window=30), False), (PackingRule(packed=False), False)],
)
def test_a_trajectory_is_packed_only_where_the_rule_allows(rule, long_packed):
    short, long = traj(4, 10, [4, 14]), traj(4, 60, [4, 34, 64])
    plan = plan_batch([short, long], strategy="packed", rule=rule, share_min_tokens=0, **BUDGETS)
    tree = {s.traj for p in plan.passes if p.tree for g in p.groups for s in g}
    plain = {s.traj for p in plan.passes if not p.tree for g in p.groups for s in g}
    assert (1 in tree) == long_packed and (1 in plain) == (not long_packed)
    assert (0 in tree) == rule.packed
    assert not tree & plain


def test_only_packed_trajectories_share_a_prefix():
    # Two trajectories with a 40-token common prompt: shared when both pack, never
    # when the window sends one of them to per-prefix.
    a, b = traj(40, 5, [40, 45]), traj(40, 50, [40, 70, 90])
    both = plan_batch([a, b], strategy="packed", share_min_tokens=8, **BUDGETS)
    assert any(p.shared >= 40 for p in both.passes)
    limited = plan_batch([a, b], strategy="packed", rule=PackingRule(window=60), share_min_tokens=8, **BUDGETS)
    assert all(p.shared == 0 for p in limited.passes)


def test_a_token_id_past_the_embedding_fails_only_its_trajectory():
    bad = TrajectoryProbes(trunk=[1, 2, 50_000], contexts=[[1, 2, 50_000, 3]], references=[[5]])
    plan = plan_batch([traj(4, 4, [4, 8]), bad], strategy="packed", share_min_tokens=0, vocab_rows=49_152, **BUDGETS)
    assert "outside the model's embedding" in plan.failed[1] and 0 not in plan.failed
    assert {s.traj for p in plan.passes for g in p.groups for s in g} == {0}
