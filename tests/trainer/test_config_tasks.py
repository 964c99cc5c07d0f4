"""The trainer's config (one pydantic model over a TOML file) and its tasks
(reasoning-gym splits and reference variants)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepcredit_trainer import cli
from stepcredit_trainer.config import ConfigError, TrainConfig, load_config
from stepcredit_trainer.tasks import TaskError, load_split, reference_variants

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["tiny.toml", "bench.toml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "trainer" / "configs" / name)
    assert config.task.name == "chain_sum" and config.run.scorer == "live"


def test_defaults_are_trl_grpo_defaults():
    objective = TrainConfig().objective
    assert (objective.epsilon, objective.epsilon_high, objective.kl_beta) == (0.2, None, 0.0)
    assert objective.aggregation == "token" and objective.scale_rewards == "group"
    assert TrainConfig().optim.max_grad_norm == 1.0
    # Measured otherwise (BENCHMARKS.md): the sampling temperature.
    assert TrainConfig().rollout.temperature == 0.7


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[rollout]\ngroup_size = 1\n", "rollout.group_size"),
        ("[rollout]\ntemperature = 0\n", "rollout.temperature"),
        ("[objective]\nepsilon = 1.5\n", "objective.epsilon"),
        ("[objective]\nmig_reading = 'tokens'\n", "objective.mig_reading"),
        ("[objective]\nalpha = 0\nbeta = 0\ngamma = 0\n", "objective"),
        ("[task]\ntrain_seed = 3\neval_seed = 3\n", "task"),
        ("[run]\nstep = 10\n", "run.step"),  # a typo is an error, never ignored
        ("[optim]\nlearning_rate = -1\n", "optim.learning_rate"),
        ("[run]\nname = '../escape'\n", "run.name"),
        ("[extra]\nx = 1\n", "extra"),
        ("[policy]\ndevice = 'gpu'\n", "policy.device"),  # a traceback at load time before
    ],
)
def test_a_bad_config_is_an_error_naming_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert f"{field}:" in str(caught.value)


def test_bad_toml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[run\n"))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_cli_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    assert cli.main(["--config", str(write(tmp_path, "[rollout]\ngroup_size = 0\n"))]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_service_url_comes_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("STEPCREDIT_URL", "http://scorer:9000")
    assert TrainConfig().service.resolved_url() == "http://scorer:9000"
    assert TrainConfig.model_validate({"service": {"url": "http://a:1"}}).service.resolved_url() == "http://a:1"
    monkeypatch.delenv("STEPCREDIT_URL")
    assert TrainConfig().service.resolved_url() == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("answer", "variants"),
    [
        ("12", ("12", "12.0")),
        ("-4", ("-4", "-4.0")),
        ("3/4", ("3/4", "0.75")),
        ("6/3", ("6/3", "2")),
        ("1/3", ("1/3",)),  # no exact decimal: no variant
        ("0.5", ("0.5", "1/2")),
        ("2.0", ("2.0", "2")),
        ("x + 1", ("x + 1",)),
        ("  7 ", ("7", "7.0")),
        ("1/0", ("1/0",)),
    ],
)
def test_reference_variants_are_equivalent_numeric_forms(answer, variants):
    assert reference_variants(answer) == variants


def test_splits_come_from_reasoning_gym_with_different_seeds():
    config = TrainConfig.model_validate({"task": {"name": "chain_sum", "train_size": 20, "eval_size": 20}})
    train, held_out = load_split(config.task, "train"), load_split(config.task, "eval")
    assert len(train) == len(held_out) == 20
    assert {p.question for p in train} != {p.question for p in held_out}
    again = load_split(config.task, "train")
    assert [p.question for p in again] == [p.question for p in train]  # seeded: reproducible
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", size=20, seed=config.task.train_seed)[0]
    assert train[0].question == entry["question"] and train[0].references[0] == entry["answer"]


def test_an_unknown_task_or_bad_difficulty_names_the_field():
    for task in ({"name": "no_such_task"}, {"name": "chain_sum", "params": {"min_terms": "many"}}):
        config = TrainConfig.model_validate({"task": task})
        with pytest.raises(TaskError, match="task.name / task.params"):
            load_split(config.task, "train")


def test_the_readme_documents_every_config_field():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for attribute, field in TrainConfig.model_fields.items():
        section = field.alias or attribute  # `validate` is the TOML key of the `validate_` field
        for name in field.annotation.model_fields:
            assert f"| `{section}.{name}` |" in readme, f"{section}.{name} is not in README's trainer table"


@pytest.mark.parametrize("name", ["tiny.toml", "bench.toml"])
def test_the_eval_split_holds_no_training_question(name):
    """reasoning-gym seeds item i with Random(seed + i): with train_seed 1 and eval_seed 2
    the eval split was the training split shifted by one item, all 16 eval prompts
    trained on. The held-out split must share no question with the training split."""
    task = load_config(ROOT / "trainer" / "configs" / name).task
    train, held_out = load_split(task, "train"), load_split(task, "eval")
    questions = [p.question for p in held_out]
    assert len(held_out) == task.eval_size and len(set(questions)) == len(questions)
    assert not set(questions) & {p.question for p in train}


def test_a_problem_space_the_training_split_exhausts_leaves_no_eval_split():
    # 2 one-digit terms and a sign: 200 questions, nearly all in 512 training prompts.
    task = TrainConfig.model_validate(
        {"task": {"params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "train_size": 512}}
    ).task
    with pytest.raises(TaskError, match="task.eval_size"):
        load_split(task, "eval")


def test_params_that_fail_only_when_an_item_is_generated_name_the_field():
    # chain_sum's config accepts 2.5 terms; random.randrange refuses it per item.
    config = TrainConfig.model_validate({"task": {"params": {"min_terms": 2.5, "max_terms": 3}}})
    with pytest.raises(TaskError, match="task.params"):
        load_split(config.task, "train")
