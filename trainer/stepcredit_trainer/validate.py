"""`stepcredit-train validate`: is ℓ_k a good value estimate for this policy on this task?

The paper's Monte-Carlo study, run on your scorer, your policy and your task:

    N chains: the policy's own rollouts, or the dataset's worked solutions
    the service scores each chain: ℓ_0..ℓ_K, the watermark h_k, the gains g_k
    from every step boundary k = 0..K, M continuations sampled from the policy;
        V_k = the fraction of them the service verifies correct (Monte-Carlo value)
    Spearman ρ of each valuation against V_k, and of each step credit against
    ΔV_k = V_k − V_{k−1}: pooled over every (chain, k), and within chains
    (the mean of per-chain ρ), with percentile intervals from resampling chains.

Outputs in the run folder: figures.json, chains.jsonl (every chain's numbers),
scatter.png, validate.html, and chains.html (the step-credit page of the chains).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, ValidateConfig
from .evaluate import score_rollouts
from .rollout import Policy, Rollout
from .tasks import Problem

__all__ = [
    "CREDITS",
    "ChainData",
    "VALUATIONS",
    "ValidateError",
    "analyze",
    "credits",
    "reanalyze",
    "valuations",
    "validate",
]


class ValidateError(RuntimeError):
    pass


VALUATIONS = {
    "likelihood": "ℓ_k, the step likelihood (content-aware)",
    "watermark": "h_k, MIG's watermark (best ℓ so far)",
    "position": "k/K, position heuristic",
    "final_only": "ℓ_K, the final likelihood only",
    "position_weighted": "position-weighted mean of ℓ_0..ℓ_k",
}
"""State valuations v̂_k (k = 0..K), compared with V_k."""

CREDITS = {
    "mig_gain": "g_k, MIG's gain over the watermark",
    "plain_delta": "ℓ_k − ℓ_{k−1}, plain deltas",
    "position": "k/K, position heuristic",
    "final_only": "ℓ_K − ℓ_0 on every step (final likelihood only)",
    "position_weighted": "change of the position-weighted mean",
}
"""Step credits ĉ_k (k = 1..K), compared with ΔV_k."""


@dataclass
class ChainData:
    """One chain's numbers: what the statistics read (and chains.jsonl holds)."""

    id: str
    loglik: list[float]
    """ℓ_0 (the baseline), ℓ_1..ℓ_K."""
    watermark: list[float]
    """h_0 = ℓ_0, h_1..h_K."""
    gains: list[float]
    """g_1..g_K, as the service reported them."""
    values: list[float | None]
    """V_0..V_K; None where no continuation of that prefix got a verdict."""
    verdicts: list[int] = field(default_factory=list)
    """Continuations with a verdict, per prefix (the n behind each V_k)."""
    correct: bool | None = None
    """The chain's own verdict (None: its verification timed out)."""
    unverified: list[int] = field(default_factory=list)
    """Continuations without a verdict, per prefix: the service failed the item, or its
    verification timed out. Left out of V_k, never counted as wrong."""
    truncated: list[int] = field(default_factory=list)
    """Continuations with a verdict that stopped at the token cap, per prefix: they are in
    V_k as what they are (no answer within the budget), and counted, because a cap too
    short for early prefixes lowers their V_k whatever the state is worth."""

    def check(self) -> None:
        """Shapes a reader of chains.jsonl relies on; ValueError naming what is off."""
        steps = len(self.gains)
        if steps < 1:
            raise ValueError(f"chain {self.id!r}: no steps")
        for name in ("loglik", "watermark", "values"):
            if len(getattr(self, name)) != steps + 1:
                raise ValueError(f"chain {self.id!r}: {name} has {len(getattr(self, name))} entries, not K + 1 = {steps + 1}")
        for name in ("verdicts", "unverified", "truncated"):
            if getattr(self, name) and len(getattr(self, name)) != steps + 1:
                raise ValueError(f"chain {self.id!r}: {name} has {len(getattr(self, name))} entries, not K + 1 = {steps + 1}")
        if any(v is not None and not 0 <= v <= 1 for v in self.values):
            raise ValueError(f"chain {self.id!r}: a value outside [0, 1]")


def valuations(chain: ChainData) -> dict[str, list[float]]:
    ell = chain.loglik
    steps = len(ell) - 1
    weighted, total, weight = [], 0.0, 0.0
    for j, value in enumerate(ell):
        total += (j + 1) * value
        weight += j + 1
        weighted.append(total / weight)
    return {
        "likelihood": list(ell),
        "watermark": list(chain.watermark),
        "position": [k / steps for k in range(steps + 1)],
        "final_only": [ell[-1]] * (steps + 1),
        "position_weighted": weighted,
    }


def credits(chain: ChainData) -> dict[str, list[float]]:
    ell = chain.loglik
    steps = len(ell) - 1
    weighted = valuations(chain)["position_weighted"]
    return {
        "mig_gain": list(chain.gains),
        "plain_delta": [ell[k] - ell[k - 1] for k in range(1, steps + 1)],
        "position": [k / steps for k in range(1, steps + 1)],
        "final_only": [ell[-1] - ell[0]] * steps,
        "position_weighted": [weighted[k] - weighted[k - 1] for k in range(1, steps + 1)],
    }


def _deltas(values: Sequence[float | None]) -> list[float | None]:
    return [None if a is None or b is None else b - a for a, b in zip(values, values[1:])]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (ties ranked by their mean), NaN when either side is constant or has < 3 points."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


def _pairs(estimates: Sequence[float], targets: Sequence[float | None]) -> tuple[list[float], list[float]]:
    kept = [(e, t) for e, t in zip(estimates, targets) if t is not None]
    return [e for e, _ in kept], [t for _, t in kept]


MIN_CHAINS_FOR_INTERVAL = 5
"""Fewer chains than this behind an estimate: no interval. Resampling one or two chains
gives a spread of (nearly) zero, which would read as certainty."""


def _interval(samples: list[float], chains: int) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of the bootstrap replicates that are defined;
    None when fewer than half are, or too few chains stand behind the estimate."""
    defined = [s for s in samples if not math.isnan(s)]
    if chains < MIN_CHAINS_FOR_INTERVAL or len(defined) < len(samples) / 2:
        return None
    return [float(np.percentile(defined, 2.5)), float(np.percentile(defined, 97.5))]


def _correlate(series: list[tuple[list[float], list[float]]], draws: Sequence[np.ndarray]) -> tuple[dict, dict]:
    """Pooled and within-chain ρ of one estimator over chains [(estimates, targets)], each
    with a percentile interval from resampling whole chains (points of one chain are not
    independent: a chain's steps share its problem and its text). Every estimator is
    resampled with the same `draws`, so differences between them have intervals too.
    Returns the figures and the replicates."""
    per_chain = [_spearman(x, y) for x, y in series]

    def pooled(indices) -> float:
        xs = [v for i in indices for v in series[i][0]]
        ys = [v for i in indices for v in series[i][1]]
        return _spearman(xs, ys)

    def within(indices) -> float:
        defined = [per_chain[i] for i in indices if not math.isnan(per_chain[i])]
        return float(np.mean(defined)) if defined else math.nan

    everything = range(len(series))
    boot_pooled = [pooled(draw) for draw in draws]
    boot_within = [within(draw) for draw in draws]

    def clean(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 4)

    def rounded(ci):
        return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]

    ranked = sum(not math.isnan(r) for r in per_chain)
    with_points = sum(bool(x) for x, _ in series)
    figures = {
        "pooled": {
            "rho": clean(pooled(everything)),
            "ci95": rounded(_interval(boot_pooled, with_points)),
            "points": sum(len(x) for x, _ in series),
        },
        "within": {
            "rho": clean(within(everything)),
            "ci95": rounded(_interval(boot_within, ranked)),
            "chains": ranked,
        },
    }
    point = {"pooled": pooled(everything), "within": within(everything)}
    chains = {"pooled": with_points, "within": ranked}
    return figures, {"point": point, "pooled": boot_pooled, "within": boot_within, "chains": chains}


def _difference(a: dict, b: dict) -> dict:
    """ρ of estimator a minus ρ of estimator b, pooled and within, with the interval of the
    paired replicates (the same resampled chains for both)."""
    out = {}
    for kind in ("pooled", "within"):
        point = a["point"][kind] - b["point"][kind]
        pairs = [x - y for x, y in zip(a[kind], b[kind])]
        # The interval needs enough chains behind both estimates (one ranked chain resamples to a width of 0).
        ci = _interval(pairs, min(a["chains"][kind], b["chains"][kind]))
        out[kind] = {
            "difference": None if math.isnan(point) else round(point, 4),
            "ci95": None if ci is None or math.isnan(point) else [round(ci[0], 4), round(ci[1], 4)],
        }
    return out


COMPARISONS = {
    "likelihood_minus_position": ("value", "likelihood", "position"),
    "mig_gain_minus_position": ("credit", "mig_gain", "position"),
}
"""The paper's question: does the content-aware signal beat position? (group, a, b): ρ_a − ρ_b."""


def analyze(chains: Sequence[ChainData], *, rounds: int = 1000, seed: int = 0) -> dict:
    """Every valuation against V_k and every credit against ΔV_k (see the module doc)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(chains), len(chains)) for _ in range(rounds if chains else 0)]
    value_series = {name: [] for name in VALUATIONS}
    credit_series = {name: [] for name in CREDITS}
    for chain in chains:
        for name, estimates in valuations(chain).items():
            value_series[name].append(_pairs(estimates, chain.values))
        for name, estimates in credits(chain).items():
            credit_series[name].append(_pairs(estimates, _deltas(chain.values)))
    results = {
        "value": {name: _correlate(s, draws) for name, s in value_series.items()},
        "credit": {name: _correlate(s, draws) for name, s in credit_series.items()},
    }
    figures = {group: {name: r[0] for name, r in entries.items()} for group, entries in results.items()}
    figures["comparisons"] = {
        name: _difference(results[group][a][1], results[group][b][1]) for name, (group, a, b) in COMPARISONS.items()
    }
    return figures


# --- sampling and scoring -------------------------------------------------------------


def _dataset_chain(policy: Policy, problem: Problem, prompt: str) -> Rollout:
    """The worked solution as a completion in the think/answer format, every token forced."""
    completion = f"<think>\n{problem.solution.strip()}\n</think>\n<answer>{problem.references[0]}</answer>"
    ids = policy.tokenizer(completion, add_special_tokens=False)["input_ids"]
    return replace(policy.start(problem, prompt, ids), completion=completion)


def _item(rollout: Rollout) -> dict:
    return {
        "id": rollout.problem.id,
        "prompt": rollout.prompt,
        "completion": rollout.completion,
        "references": list(rollout.problem.references),
        "completion_token_ids": rollout.completion_ids,
        **({"images": list(rollout.problem.images)} if rollout.problem.images else {}),
    }


def _boundaries(result) -> list[int]:
    """Token index (into the chain's completion ids) where the state after k steps ends, k = 0..K."""
    steps = result.steps
    if any(s.token_start is None or s.token_end is None for s in steps):
        raise ValidateError("the service reported no token indices for the chain's steps (it did not read the ids)")
    return [steps[0].token_start] + [s.token_end for s in steps]


def _chain_data(rollout: Rollout, result) -> ChainData:
    return ChainData(
        id=rollout.problem.id,
        loglik=[result.baseline_loglik] + [s.loglik for s in result.steps],
        watermark=[result.baseline_loglik] + [s.watermark for s in result.steps],
        gains=[s.gain for s in result.steps],
        values=[],
        correct=None if result.verify_timeout else bool(result.correct),
    )


def count_verdict(counts: list[int], result, truncated: bool) -> bool:
    """Add one continuation's outcome to its prefix's [correct, verdicts, unverified,
    truncated]; False when it has no verdict (the service failed the item, no result
    arrived, or verification timed out): it leaves V_k, it is never a wrong answer."""
    if result is None or result.status != "ok" or result.verify_timeout:
        counts[2] += 1
        return False
    counts[0] += bool(result.correct)
    counts[1] += 1
    counts[3] += bool(truncated)
    return True


def _chunks(seq: Sequence, size: int):
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


Progress = Callable[[str, int, int], None]
"""(phase, done, total): "chains" while chains are collected, "continuations" after."""


def validate(config: TrainConfig, output_dir: str | Path, *, client=None, on_progress: Progress | None = None) -> dict:
    """Run the check; write figures.json, chains.jsonl, scatter.png, validate.html,
    chains.html under `output_dir` and return the figures."""
    from stepcredit_client import Client, ClientConfig

    from .rollout import load_policy, resolve_policy_path, text_only_mismatch
    from .tasks import load_problems
    from .train import _check_same_tokenizer

    settings = config.validate_
    progress = on_progress or (lambda phase, done, total: None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    temperature = settings.temperature or config.rollout.temperature
    max_new_tokens = settings.max_new_tokens or config.rollout.max_new_tokens
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": config.rollout.top_p}

    policy_path = resolve_policy_path(config.policy.model)
    policy = load_policy(policy_path, config.policy.device, config.policy.dtype)
    wanted = settings.problems
    dataset = settings.chains == "dataset"
    problems = load_problems(
        config.task, settings.seed, wanted if dataset else wanted * settings.attempts,
        settings.solution_field if dataset else None,
    )  # fmt: skip
    if mismatch := text_only_mismatch(policy, config.task.name, problems):
        raise ValidateError(mismatch)
    own_client = client is None
    if client is None:
        api_key = os.environ.get(config.service.api_key_env) or None
        client = Client(config.service.resolved_url(), api_key=api_key, config=ClientConfig(timeout=config.service.timeout_s))
    try:
        client.wait_until_ready(config.service.ready_timeout_s)
        _check_same_tokenizer(policy, client)
        service_model = client.model().model_dump()
        options = {"format": "think_answer", "acc_weight": 1.0, "format_weight": config.objective.format_weight}

        # 1. chains, scored once (ℓ_k, h_k, g_k and the step boundaries)
        chains: list[tuple[Rollout, object]] = []
        passed_over = {"too_few_steps": 0, "service_error": 0}
        tried = 0
        revisions: set[str] = set()
        progress("chains", 0, wanted)
        position = 0
        while len(chains) < wanted and position < len(problems):
            # Policy rollouts: about twice the chains still wanted (some are passed over).
            need = wanted - len(chains)
            batch = problems[position : position + min(settings.batch_rows, need if dataset else 2 * need)]
            position += len(batch)
            if dataset:
                rollouts = [_dataset_chain(policy, p, policy.render(p, config.task.system_prompt)) for p in batch]
            else:
                rollouts = policy.sample(
                    batch, system_prompt=config.task.system_prompt, response_prefix=config.task.response_prefix,
                    group_size=1, **sampling,
                )
            scored = score_rollouts(client, rollouts, options)
            if scored.request_error and all(r is None for r in scored.results):
                raise ValidateError(f"the service could not score the chains: {scored.request_error}")
            revisions.update(scored.revisions)
            for rollout, result in zip(rollouts, scored.results):
                tried += 1
                if result is None or result.status != "ok":
                    passed_over["service_error"] += 1
                elif len(result.steps) < settings.min_steps:
                    passed_over["too_few_steps"] += 1
                elif len(chains) < wanted:
                    chains.append((rollout, result))
            progress("chains", len(chains), wanted)
        if not chains:
            raise ValidateError(
                f"no usable chain in {tried} problems ({passed_over}): lower validate.min_steps, raise "
                "validate.attempts or rollout.max_new_tokens, or use validate.chains = 'dataset'"
            )

        if len(revisions) > 1:  # ℓ_k of two models' weights are not one valuation
            raise ValidateError(
                f"the service's weights changed while the chains were scored ({sorted(revisions)}): "
                "run the check while nothing reloads the service"
            )

        # 2. M continuations from every step boundary, verified by the service
        starts: list[tuple[int, int, Rollout]] = []
        data = []
        for c, (rollout, result) in enumerate(chains):
            chain = _chain_data(rollout, result)
            data.append(chain)
            ids = rollout.completion_ids
            for k, end in enumerate(_boundaries(result)):
                start = replace(rollout, prefix_ids=ids[:end], sampled_ids=[], completion="", truncated=False)
                starts.extend((c, k, start) for _ in range(settings.samples))
        tally = {(c, k): [0, 0, 0, 0] for c, k, _ in starts}  # correct, verdicts, unverified, truncated
        errors = 0
        done = 0
        progress("continuations", 0, len(starts))
        for batch in _chunks(starts, settings.batch_rows):
            continued = policy.continue_from([s for _, _, s in batch], **sampling)
            for group in _chunks(list(zip(batch, continued)), settings.score_batch):
                scored = score_rollouts(client, [r for _, r in group], {**options, "max_steps": 1})
                for ((c, k, _), continuation), result in zip(group, scored.results):
                    errors += not count_verdict(tally[(c, k)], result, continuation.truncated)
            done += len(batch)
            progress("continuations", done, len(starts))
        for c, chain in enumerate(data):
            boundaries = len(chain.loglik)
            counts = [tally[(c, k)] for k in range(boundaries)]
            chain.verdicts = [n for _, n, _, _ in counts]
            chain.unverified = [u for _, _, u, _ in counts]
            chain.truncated = [t for _, _, _, t in counts]
            chain.values = [right / n if n else None for right, n, _, _ in counts]

        # 3. figures
        figures = _summary(data, settings, config, errors, len(starts), tried, passed_over)
        figures.update(analyze(data, rounds=settings.bootstrap, seed=settings.seed))
        figures["service_model"] = service_model
        figures["policy"] = str(policy_path)
        figures["seconds"] = round(time.perf_counter() - started, 1)
        (out / "figures.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False))
        with (out / "chains.jsonl").open("w", encoding="utf-8") as f:
            for chain in data:
                f.write(json.dumps(asdict(chain)) + "\n")
        # The chains as the service saw them, and its results: `stepcredit report` redraws the page.
        with (out / "chain_items.jsonl").open("w", encoding="utf-8") as f:
            for rollout, _ in chains:
                f.write(json.dumps(_item(rollout)) + "\n")
        with (out / "chain_results.jsonl").open("w", encoding="utf-8") as f:
            for _, result in chains:
                f.write(result.model_dump_json() + "\n")
        _scatter(data, figures, out / "scatter.png")
        _page(figures, data, out)
        _chains_page(chains, data, figures, out / "chains.html", settings.report_chains)
        if errors > settings.max_without_verdict * len(starts):
            # Failures cluster where continuations are long (late prefixes): V_k there would
            # rest on the ones that happened to be short. The files are written; --reanalyze reads them.
            raise ValidateError(
                f"{errors} of {len(starts)} continuations got no verdict (service errors or verification "
                f"time-outs), over validate.max_without_verdict = {settings.max_without_verdict}: the figures in "
                f"{out} may be biased; see the service's errors (e.g. its token limits)"
            )
        return figures
    finally:
        if own_client:
            client.close()


def reanalyze(folder: str | Path) -> dict:
    """The statistics again from a finished run's chains.jsonl (no sampling, no service):
    figures.json, scatter.png and validate.html are rewritten; the sampled values stay."""
    out = Path(folder)
    try:
        figures = json.loads((out / "figures.json").read_text(encoding="utf-8"))
        lines = (out / "chains.jsonl").read_text(encoding="utf-8").splitlines()
        data = [ChainData(**json.loads(line)) for line in lines if line.strip()]
        for chain in data:
            chain.check()
        settings = ValidateConfig.model_validate(figures.get("settings", {}))
    except (OSError, ValueError, TypeError) as exc:
        raise ValidateError(f"{out} holds no finished validate run: {exc}") from None
    if not data:
        raise ValidateError(f"{out}/chains.jsonl holds no chain")
    figures.update(analyze(data, rounds=settings.bootstrap, seed=settings.seed))
    (out / "figures.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    _scatter(data, figures, out / "scatter.png")
    _page(figures, data, out)
    return figures


def _summary(data, settings, config, errors, continuations, tried, passed_over) -> dict:
    starts = [c.values[0] for c in data if c.values[0] is not None]
    ends = [c.values[-1] for c in data if c.values[-1] is not None]
    cut_first = [c.truncated[0] / c.verdicts[0] for c in data if c.truncated and c.verdicts[0]]
    cut_last = [c.truncated[-1] / c.verdicts[-1] for c in data if c.truncated and c.verdicts[-1]]
    noise = [math.sqrt(v * (1 - v) / n) for c in data for v, n in zip(c.values, c.verdicts) if v is not None and n]
    return {
        "task": {"name": config.task.name, "params": config.task.params},
        "chains_from": settings.chains,
        "chains": len(data),
        "problems_tried": tried,
        "passed_over": passed_over,
        "samples_per_prefix": settings.samples,
        "prefixes": sum(len(c.values) for c in data),
        "steps_per_chain": round(float(np.mean([len(c.gains) for c in data])), 3),
        "continuations": continuations,
        "continuations_without_verdict": errors,
        "continuations_cut_off": sum(sum(c.truncated) for c in data),
        "cut_off_share_first_prefix": round(float(np.mean(cut_first)), 4) if cut_first else None,
        "cut_off_share_last_prefix": round(float(np.mean(cut_last)), 4) if cut_last else None,
        "chain_accuracy": round(float(np.mean([bool(c.correct) for c in data if c.correct is not None])), 4)
        if any(c.correct is not None for c in data) else None,
        "mean_value_first": round(float(np.mean(starts)), 4) if starts else None,
        "mean_value_last": round(float(np.mean(ends)), 4) if ends else None,
        "mean_mc_standard_error": round(float(np.mean(noise)), 4) if noise else None,
        "settings": settings.model_dump(),
        "temperature": settings.temperature or config.rollout.temperature,
        "max_new_tokens": settings.max_new_tokens or config.rollout.max_new_tokens,
    }


def _cell(entry: dict) -> str:
    """ρ [95% interval], and for within-chain figures the chains that could be ranked."""
    count = f" ({entry['chains']} chains)" if "chains" in entry else ""
    if entry["rho"] is None:
        return "n/a" + count
    ci = entry["ci95"]
    text = f"{entry['rho']:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else f"{entry['rho']:+.3f} [no interval]"
    return text + count


def table_rows(figures: dict) -> list[list[str]]:
    """The figures as markdown-ready rows: estimator, ρ vs V_k pooled, within; ρ vs ΔV_k pooled, within."""
    rows = []
    pairs = [("likelihood", "plain_delta"), ("watermark", "mig_gain"), ("position", "position"),
             ("final_only", "final_only"), ("position_weighted", "position_weighted")]  # fmt: skip
    for value, credit in pairs:
        v, c = figures["value"][value], figures["credit"][credit]
        rows.append([
            f"{VALUATIONS[value]} / {CREDITS[credit]}",
            _cell(v["pooled"]), _cell(v["within"]), _cell(c["pooled"]), _cell(c["within"]),
        ])  # fmt: skip
    return rows


def comparison_lines(figures: dict) -> list[str]:
    """ρ(ℓ_k) − ρ(k/K) and ρ(g_k) − ρ(k/K), with the paired intervals."""
    lines = []
    names = {"likelihood_minus_position": "ρ(ℓ_k, V_k) − ρ(k/K, V_k)", "mig_gain_minus_position": "ρ(g_k, ΔV_k) − ρ(k/K, ΔV_k)"}
    for key, label in names.items():
        parts = []
        for kind in ("pooled", "within"):
            entry = figures["comparisons"][key][kind]
            if entry["difference"] is None:
                parts.append(f"{kind} n/a")
            elif entry["ci95"] is None:
                parts.append(f"{kind} {entry['difference']:+.3f} [no interval]")
            else:
                low, high = entry["ci95"]
                parts.append(f"{kind} {entry['difference']:+.3f} [{low:+.2f}, {high:+.2f}]")
        lines.append(f"{label}: " + ", ".join(parts))
    return lines


def markdown_table(figures: dict) -> str:
    head = "| valuation / step credit | ρ vs V_k, pooled | ρ vs V_k, within chain | ρ vs ΔV_k, pooled | ρ vs ΔV_k, within chain |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(figures)]
    return "\n".join(lines + [""] + comparison_lines(figures))


def _scatter(data: Sequence[ChainData], figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    xs, ys, cs = [], [], []
    for chain in data:
        steps = len(chain.loglik) - 1
        for k, (ell, v) in enumerate(zip(chain.loglik, chain.values)):
            if v is not None:
                xs.append(ell)
                ys.append(v)
                cs.append(k / steps)
    jitter = rng.uniform(-0.015, 0.015, len(ys))
    points = left.scatter(xs, np.array(ys) + jitter, c=cs, cmap="viridis", s=14, alpha=0.75)
    fig.colorbar(points, ax=left, label="k / K")
    rho = figures["value"]["likelihood"]
    left.set(xlabel="ℓ_k (mean log-prob of the reference)", ylabel="V_k (Monte-Carlo, jittered)",
             title=f"ℓ_k vs V_k: pooled ρ {_cell(rho['pooled'])}")  # fmt: skip
    gx, gy = [], []
    for chain in data:
        for g, dv in zip(chain.gains, _deltas(chain.values)):
            if dv is not None:
                gx.append(g)
                gy.append(dv)
    right.scatter(gx, gy, s=14, alpha=0.75, color="#c2410c")
    right.axhline(0, color="#999", lw=0.8)
    rho = figures["credit"]["mig_gain"]
    right.set(xlabel="g_k (MIG gain)", ylabel="ΔV_k = V_k − V_{k−1}", title=f"g_k vs ΔV_k: pooled ρ {_cell(rho['pooled'])}")
    fig.suptitle(f"{figures['chains']} chains, M = {figures['samples_per_prefix']} continuations per prefix", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buffer.getvalue())


def _page(figures: dict, data: Sequence[ChainData], out: Path) -> None:
    """validate.html: one self-contained file (the scatter inlined), nothing fetched at view time."""
    e = html.escape
    png = base64.b64encode((out / "scatter.png").read_bytes()).decode()
    header = ["valuation / step credit", "ρ vs V_k, pooled", "ρ vs V_k, within chain", "ρ vs ΔV_k, pooled", "ρ vs ΔV_k, within chain"]
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table_rows(figures))
    facts = {
        "task": f"{figures['task']['name']} {json.dumps(figures['task']['params'])}",
        "chains": f"{figures['chains']} ({figures['chains_from']}), {figures['steps_per_chain']} steps each on average",
        "continuations": f"{figures['continuations']} (M = {figures['samples_per_prefix']} per prefix, "
        f"{figures['continuations_without_verdict']} without a verdict)",
        "mean V at the first / last prefix": f"{figures['mean_value_first']} / {figures['mean_value_last']}",
        "Monte-Carlo standard error of V_k (mean)": str(figures["mean_mc_standard_error"]),
        "continuations cut off at the token cap (share at the first / last prefix)":
            f"{figures.get('continuations_cut_off')} ({figures.get('cut_off_share_first_prefix')} / "
            f"{figures.get('cut_off_share_last_prefix')})",
        "paired differences (95% interval)": "; ".join(comparison_lines(figures)),
        "scorer": f"{figures['service_model'].get('name')} (revision {figures['service_model'].get('revision')})",
        "policy": figures["policy"],
        "seconds": str(figures["seconds"]),
    }
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts.items())
    chain_rows = []
    for chain in data[:200]:
        values = " ".join("–" if v is None else f"{v:.2f}" for v in chain.values)
        ells = " ".join(f"{x:.2f}" for x in chain.loglik)
        chain_rows.append(
            f"<tr><td>{e(chain.id)}</td><td>{len(chain.gains)}</td><td>{'yes' if chain.correct else 'no'}</td>"
            f"<td class=num>{e(values)}</td><td class=num>{e(ells)}</td></tr>"
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>StepCredit value-proxy check</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1f2937; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} td, th {{ border: 1px solid #d1d5db; padding: 4px 8px; text-align: left; }}
td.num {{ font-family: ui-monospace, monospace; }} th {{ background: #f3f4f6; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>Is ℓ<sub>k</sub> a value estimate? The value-proxy check</h1>
<p>For every step prefix of each chain, {figures['samples_per_prefix']} continuations were sampled from the policy;
V<sub>k</sub> is the fraction the service verified correct. Spearman ρ of each valuation with V<sub>k</sub>, and of
each step credit with ΔV<sub>k</sub>, pooled over all prefixes and within chains (the mean of per-chain ρ), with 95%
intervals from resampling chains. The paper reports ρ ≈ 0.62 for its step valuation and ≈ 0.25 for position
heuristics. <a href="chains.html">The chains' step-credit page</a>.</p>
<table>{fact_rows}</table>
<table><tr>{''.join(f'<th>{e(h)}</th>' for h in header)}</tr>{rows}</table>
<img alt="ℓ_k vs V_k and g_k vs ΔV_k" src="data:image/png;base64,{png}">
<h2>Chains</h2>
<table><tr><th>problem</th><th>K</th><th>chain correct</th><th>V_0 … V_K</th><th>ℓ_0 … ℓ_K</th></tr>{''.join(chain_rows)}</table>
</body></html>
"""
    (out / "validate.html").write_text(page, encoding="utf-8")


def _chains_page(chains, data, figures, path: Path, limit: int) -> None:
    if limit == 0:
        return
    from stepcredit_client.report import write_report

    items, results = [], []
    for (rollout, result), chain in list(zip(chains, data))[:limit]:
        values = ", ".join("–" if v is None else f"{v:.2f}" for v in chain.values)
        # The page shows each chain's Monte-Carlo values beside its id (the card is
        # titled by the result's id: the service echoed the request's, an index).
        label = f"{rollout.problem.id}  V = [{values}]"
        items.append({**_item(rollout), "id": label})
        results.append({**result.model_dump(mode="json"), "id": label})
    meta = {"scorer": figures["service_model"].get("name"), "revision": figures["service_model"].get("revision"),
            "chains": figures["chains"]}  # fmt: skip
    write_report(path, items, results, title="StepCredit: value-proxy chains", meta=meta)
