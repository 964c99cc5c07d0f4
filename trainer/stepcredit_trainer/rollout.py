"""The policy's side: load it, sample G completions per prompt, score its own tokens.

Layout of a batch (generation and the training forward share it): prompts
left-padded to one width, then the completion (forced `response_prefix`
tokens, then the sampled ones, EOS included when sampled) right-padded to
the longest. Completion token t of every row then sits in the same column,
so per-token log-probs come out as one [B, T] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import Problem

__all__ = ["Rollout", "Policy", "load_policy", "resolve_policy_path"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Rollout:
    problem: Problem
    prompt: str
    """Chat-templated text the policy saw (what the service is sent as `prompt`)."""
    prompt_ids: list[int]
    prefix_ids: list[int]
    """Forced response-prefix tokens: scored by the service, never trained on."""
    sampled_ids: list[int]
    completion: str
    truncated: bool
    """Stopped by max_new_tokens, not by EOS."""

    @property
    def completion_ids(self) -> list[int]:
        return self.prefix_ids + self.sampled_ids


def resolve_policy_path(model: str) -> Path:
    """`default` is the service's embedded model folder (converted once); else a local folder."""
    if model == "default":
        try:
            from stepcredit.config import Settings
            from stepcredit.models import ensure_default_model
        except ImportError:
            raise FileNotFoundError(
                "policy.model = 'default' needs the stepcredit service package (for its embedded model); "
                "set policy.model to a local HF model folder instead"
            ) from None
        return ensure_default_model(Settings().cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy.model: {path} is not a local HF model folder (no config.json)")
    return path


class Policy:
    def __init__(self, model, tokenizer, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        if tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no EOS token: completions could not stop")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def render(self, problem: Problem, system_prompt: str) -> str:
        messages = [{"role": "user", "content": problem.question}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, text: str) -> list[int]:
        """The prompt's ids as the service reads the same text: the tokenizer's special
        tokens, except a BOS the chat template already rendered (never two)."""
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add)["input_ids"]

    @torch.no_grad()
    def sample(
        self,
        problems: Sequence[Problem],
        *,
        system_prompt: str,
        response_prefix: str,
        group_size: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
    ) -> list[Rollout]:
        """`group_size` completions per problem, grouped contiguously in problem order."""
        prefix_ids = self.tokenizer(response_prefix, add_special_tokens=False)["input_ids"] if response_prefix else []
        prompts = [self.render(p, system_prompt) for p in problems]
        prompt_ids = [self.encode_prompt(text) for text in prompts]
        starts = [
            Rollout(problems[i], prompts[i], prompt_ids[i], list(prefix_ids), [], "", False)
            for i in range(len(problems))
            for _ in range(group_size)
        ]
        return self.continue_from(
            starts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy
        )

    @torch.no_grad()
    def continue_from(
        self,
        starts: Sequence[Rollout],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool = False,
    ) -> list[Rollout]:
        """Sample on from each start's prompt + forced `prefix_ids` (its `sampled_ids` are
        ignored): one new rollout per start, in order, the start's prefix forced again.
        The value-proxy check continues chains from each step boundary this way."""
        rows = [s.prompt_ids + s.prefix_ids for s in starts]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        self.model.eval()
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_id,
            **sampling,
        )
        rollouts = []
        eos = self.tokenizer.eos_token_id
        for start, generated in zip(starts, output[:, width:].tolist()):
            sampled = generated[: generated.index(eos) + 1] if eos in generated else generated
            completion_ids = start.prefix_ids + sampled
            rollouts.append(
                Rollout(
                    problem=start.problem,
                    prompt=start.prompt,
                    prompt_ids=start.prompt_ids,
                    prefix_ids=list(start.prefix_ids),
                    sampled_ids=sampled,
                    completion=self.tokenizer.decode(completion_ids, skip_special_tokens=False),
                    truncated=eos not in sampled,
                )
            )
        return rollouts

    def layout(self, rollouts: Sequence[Rollout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, completion_ids [B,T], sampled_mask [B,T], prompt width)."""
        width = max(len(r.prompt_ids) for r in rollouts)
        length = max(len(r.completion_ids) for r in rollouts)
        ids, attention, completion, sampled = [], [], [], []
        for r in rollouts:
            left = width - len(r.prompt_ids)
            right = length - len(r.completion_ids)
            ids.append([self.pad_id] * left + r.prompt_ids + r.completion_ids + [self.pad_id] * right)
            attention.append([0] * left + [1] * (len(r.prompt_ids) + len(r.completion_ids)) + [0] * right)
            completion.append(r.completion_ids + [self.pad_id] * right)
            sampled.append([0] * len(r.prefix_ids) + [1] * len(r.sampled_ids) + [0] * right)

        def tensor(rows, dtype=torch.long):
            return torch.tensor(rows, dtype=dtype, device=self.device)

        return tensor(ids), tensor(attention), tensor(completion), tensor(sampled, torch.float32), width

    def token_logprobs(self, input_ids, attention_mask, completion_ids, temperature: float) -> torch.Tensor:
        """log π(token) of every completion column, [B, T]; grads flow when enabled.

        Logits are divided by the sampling temperature, as TRL does, so the
        ratio compares the distribution the tokens were drawn from."""
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        length = completion_ids.shape[1]
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=length + 1
        ).logits[:, :-1, :]
        logits = logits.float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def load_policy(path: Path, device: str = "cpu", dtype: str = "float32") -> Policy:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype]).to(target)
    return Policy(model, tokenizer, target)
