"""What runs together in the hf backend: a pure planner, no torch, no model.

The backend only executes the plan (`hf.HFBackend.compute`), as vLLM keeps its
scheduler apart from its model runner. A plan is built from the probes of one
batch of trajectories:

* a **segment** is one row's worth of tokens with what is needed to mask and
  score them. A `packed` segment holds a trajectory's trunk and one branch per
  probe (probe-prefix tokens, then one sub-branch per reference), masked as a
  tree; a `per-prefix` segment is one plain (probe, reference) sequence.
* segments whose first tokens agree (a GRPO group's prompt, a common system
  prompt) may compute those tokens once (`share_plan`);
* segments of about the same length are batched into forward passes under the
  token, row and padding budgets (`forward_groups`).

A trajectory is packed only where the tree mask expresses the model's attention
exactly (`PackingRule`); the others run per-prefix under the model's own masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..probes import TrajectoryProbes

__all__ = [
    "Segment",
    "Pass",
    "BatchPlan",
    "PackingRule",
    "PlanError",
    "common_prefix",
    "packed_segments",
    "per_prefix_segments",
    "share_plan",
    "forward_groups",
    "plan_batch",
]


class PlanError(ValueError):
    """A trajectory cannot be laid out (for example a probe with no context token)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Segment:
    """One row's worth of tokens with everything needed to mask and score them.

    Per token: `trunk` is its trunk index (-1 on branches), `limit` how many
    trunk tokens it sees, `probe` / `ref` which branch it belongs to (-1: none).
    A plain causal sequence is all trunk. Per target: the row that predicts it,
    the token, and its (traj, k, v) owner.
    """

    traj: int = -1
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    trunk: list[int] = field(default_factory=list)
    limit: list[int] = field(default_factory=list)
    probe: list[int] = field(default_factory=list)
    ref: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[tuple[int, int, int]] = field(default_factory=list)
    media: str = ""
    """Identity of the trajectory's images ("" for none): equal token ids are an equal
    prefix only under equal images (pad tokens stand for whatever image fills them)."""

    def push(self, token: int, position: int, trunk: int, limit: int, probe: int, ref: int) -> int:
        self.ids.append(token)
        self.positions.append(position)
        self.trunk.append(trunk)
        self.limit.append(limit)
        self.probe.append(probe)
        self.ref.append(ref)
        return len(self.ids) - 1

    def push_causal(self, token: int) -> int:
        i = len(self.ids)
        return self.push(token, i, i, i + 1, -1, -1)

    def score(self, source: int, token: int, owner: tuple[int, int, int]) -> None:
        self.sources.append(source)
        self.targets.append(token)
        self.owners.append(owner)

    def shareable(self) -> int:
        """How many leading tokens could come from a shared prefix pass: every later
        token must see all of them, and every scored row must lie after them."""
        if not self.sources:
            return 0
        seen = min((lim for lim, tr in zip(self.limit, self.trunk) if tr < 0), default=len(self.ids))
        return max(0, min(seen, min(self.sources), len(self.ids) - 1))


def _branch_cost(traj: TrajectoryProbes, k: int, cut: int) -> tuple[int, int]:
    """(tokens, scored positions) that probe k adds to a packed segment."""
    refs = sum(len(r) for r in traj.references)
    return len(traj.contexts[k]) - cut + refs, refs


def packed_segments(t: int, traj: TrajectoryProbes, max_tokens: int, max_rows: int) -> list[Segment]:
    """Group the probes of trajectory `t` into as few tree segments as the budgets allow."""
    cuts = [common_prefix(ctx, traj.trunk) for ctx in traj.contexts]
    # A trunk longer than the budget would otherwise be repeated for every probe.
    max_tokens = max(max_tokens, 2 * len(traj.trunk))
    groups: list[list[int]] = []
    tokens = rows = 0
    for k, cut in enumerate(cuts):
        add_tokens, add_rows = _branch_cost(traj, k, cut)
        trunk_len = max([cut] + [cuts[j] for j in groups[-1]]) if groups else cut
        if groups and trunk_len + tokens + add_tokens <= max_tokens and rows + add_rows <= max_rows:
            groups[-1].append(k)
            tokens, rows = tokens + add_tokens, rows + add_rows
        else:
            groups.append([k])
            tokens, rows = add_tokens, add_rows
    return [_build_packed(t, traj, group, cuts) for group in groups]


def _media_key(traj: TrajectoryProbes) -> str:
    return traj.media.key if traj.media is not None else ""


def _build_packed(t: int, traj: TrajectoryProbes, probes: list[int], cuts: list[int]) -> Segment:
    seg = Segment(traj=t, media=_media_key(traj))
    trunk_len = max(cuts[k] for k in probes)
    for i in range(trunk_len):
        seg.push(traj.trunk[i], i, i, i + 1, -1, -1)
    for k in probes:
        cut, tail = cuts[k], traj.contexts[k][cuts[k] :]
        # The row that predicts the first reference token: the probe's last token.
        last = cut - 1
        for i, token in enumerate(tail):
            last = seg.push(token, cut + i, -1, cut, k, -1)
        if last < 0:
            raise PlanError("a probe has no context token to condition on")
        start = cut + len(tail)
        for v, ref in enumerate(traj.references):
            prev = last
            for i, token in enumerate(ref):
                seg.score(prev, token, (t, k, v))
                prev = seg.push(token, start + i, -1, cut, k, v)
    return seg


def per_prefix_segments(t: int, traj: TrajectoryProbes) -> list[Segment]:
    """One plain causal sequence per (probe, reference)."""
    segments = []
    for k, ctx in enumerate(traj.contexts):
        if not ctx:
            raise PlanError("a probe has no context token to condition on")
        for v, ref in enumerate(traj.references):
            seg = Segment(traj=t, media=_media_key(traj))
            for token in (*ctx, *ref):
                seg.push_causal(token)
            for i, token in enumerate(ref):
                seg.score(len(ctx) - 1 + i, token, (t, k, v))
            segments.append(seg)
    return segments


def share_plan(segments: Sequence[Segment], min_tokens: int) -> list[tuple[int, list[Segment]]]:
    """Partition segments into (shared prefix length, members) clusters.

    Sorted by images and token ids, segments with long common prefixes are neighbours; a
    cluster is a run of neighbours, and sharing c tokens among m of them saves
    (m-1)·c tokens at the price of one more forward pass, counted as
    `min_tokens`. Dynamic programming over the runs picks the partition that
    saves the most. Clusters that share nothing have c = 0.
    """
    order = sorted(segments, key=lambda seg: (seg.media, seg.ids))
    n = len(order)
    cap = [seg.shareable() for seg in order]
    neighbour = [
        common_prefix(order[i].ids, order[i + 1].ids) if order[i].media == order[i + 1].media else 0
        for i in range(n - 1)
    ]
    best = [0] * (n + 1)  # best[j]: the largest saving over order[:j]
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # best[j]'s last cluster: (start, shared length)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)
        shared = cap[j - 1]
        for i in range(j - 2, -1, -1):  # the cluster order[i:j]
            shared = min(shared, cap[i], neighbour[i])
            if shared < max(min_tokens, 1):
                break
            saving = best[i] + (j - i - 1) * shared - min_tokens
            if saving > best[j]:
                best[j], cut[j] = saving, (i, shared)
    clusters = []
    j = n
    while j > 0:
        i, shared = cut[j]
        clusters.append((shared, order[i:j]))
        j = i
    return clusters[::-1]


def forward_groups(
    segments: Sequence[Segment],
    *,
    max_tokens: int,
    max_logit_rows: int,
    max_rows: int,
    max_padding: float,
    offset: int = 0,
) -> list[list[Segment]]:
    """Batch segments (longest first) under the budgets, but only with company of
    about the same length: padding is computed like real tokens, and on a
    compute-bound device it costs more than the larger batch saves. `offset`
    leading tokens come from a shared prefix and are not forwarded again."""
    order = sorted(segments, key=lambda s: len(s.ids), reverse=True)
    groups: list[list[Segment]] = []
    width = rows = tokens = 0
    for seg in order:
        n, r = len(seg.ids) - offset, len(set(seg.sources))
        size = len(groups[-1]) + 1 if groups else 1
        if (
            groups
            and width * size <= max_tokens
            and rows + r <= max_logit_rows
            and size <= max_rows
            and width * size - (tokens + n) <= max_padding * width * size
        ):
            groups[-1].append(seg)
            rows, tokens = rows + r, tokens + n
        else:
            groups.append([seg])
            width, rows, tokens = n, r, n
    return groups


@dataclass(frozen=True)
class PackingRule:
    """Where the tree mask is exact for a model.

    `packed` is False for models whose attention the tree mask cannot express at
    all (hybrid or linear-attention layers, position scaling that depends on the
    row length). `window`: the shortest sliding window of any layer; a trajectory
    whose longest probe sequence is longer runs per-prefix, under the model's own
    sliding-window masks. `one_row`: even padded sequences change each other's
    numbers (a rotary scaling computed from the longest position of the pass), so
    each runs alone. `reason` says why packing is limited (for the log and
    /v1/model)."""

    packed: bool = True
    window: int | None = None
    one_row: bool = False
    reason: str | None = None

    def packs(self, traj: TrajectoryProbes) -> bool:
        if not self.packed:
            return False
        return self.window is None or traj.longest_sequence <= self.window


@dataclass
class Pass:
    """Forward passes that share `shared` leading tokens (computed once), or none."""

    shared: int
    groups: list[list[Segment]]
    tree: bool
    """True: rows are masked as trees (4-D mask); False: plain padded sequences."""


@dataclass
class BatchPlan:
    passes: list[Pass]
    failed: dict[int, str]
    """Trajectories that cannot be laid out, with the reason."""


def plan_batch(
    batch: Sequence[TrajectoryProbes],
    *,
    strategy: str,
    rule: PackingRule = PackingRule(),
    max_tokens: int,
    max_logit_rows: int,
    max_rows: int,
    max_padding: float,
    share_min_tokens: int,
    vocab_rows: int | None = None,
) -> BatchPlan:
    """Everything the backend runs for `batch`, in order. A trajectory with a token id
    past `vocab_rows` (a tokenizer with tokens the model lacks) fails here: on CUDA the
    lookup would be a device-side assert, which poisons the whole context."""
    tree: list[Segment] = []
    plain: list[Segment] = []
    failed: dict[int, str] = {}
    for t, traj in enumerate(batch):
        packs = strategy == "packed" and rule.packs(traj)
        try:
            segments = packed_segments(t, traj, max_tokens, max_logit_rows) if packs else per_prefix_segments(t, traj)
            # Only the tokens that will be forwarded are looked at.
            top = max(max(seg.ids) for seg in segments)
            if vocab_rows is not None and top >= vocab_rows:
                raise PlanError(f"token id {top} is outside the model's embedding ({vocab_rows} rows)")
        except PlanError as exc:
            failed[t] = str(exc)
            continue
        (tree if packs else plain).extend(segments)

    budgets = dict(max_tokens=max_tokens, max_logit_rows=max_logit_rows, max_rows=max_rows, max_padding=max_padding)
    passes: list[Pass] = []
    if plain:
        passes.append(Pass(0, forward_groups(plain, **budgets), tree=False))
    if tree:
        clusters = [(0, tree)]
        if share_min_tokens > 0:
            clusters = share_plan(tree, share_min_tokens)
            # Segments that share nothing are still batched with each other.
            alone = [seg for shared, members in clusters if not shared for seg in members]
            clusters = [(0, alone)] + [(shared, members) for shared, members in clusters if shared]
        for shared, members in clusters:
            if members:
                passes.append(Pass(shared, forward_groups(members, offset=shared, **budgets), tree=True))
    return BatchPlan(passes, failed)
