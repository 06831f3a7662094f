"""The search config: defaults < YAML < flags, validation as UserError, CLI help and errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.config import SearchConfig, build_parser, parse_config
from trainables.config import OPTIONS
from trainables.defaults import SPACE as DEFAULT_SPACE
from trainables.defaults import WARM_LR
from trainables.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return str(path)


def _cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "",
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- precedence


def test_defaults():
    cfg = parse_config([])
    assert cfg.train.model == "resnet10t" and cfg.num_samples == 10
    assert cfg.max_epochs == 6 and parse_config(["--data", "x"]).max_epochs == 10  # digits: 6
    assert cfg.data is None and cfg.resolved_image_size == 32
    assert cfg.train.hflip is False
    # the epochs range is filled from --max-epochs
    assert cfg.space["epochs"] == {"low": 3, "high": 6}
    assert cfg.space["lr"] == WARM_LR  # a warm start's children (--init auto, no weights)
    assert DEFAULT_SPACE["epochs"] is None  # the shared default is not mutated


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = _yaml(tmp_path, """
num_samples: 5
max_epochs: 4
seed: 3
hflip: true
experiment: from_yaml
space:
  dropout: 0.1
  batch_size: [8, 16]
""")
    cfg = parse_config(["--config", path, "--num-samples", "7", "--no-hflip",
                        "--space", "batch_size=[32]"])
    assert cfg.num_samples == 7            # flag beats YAML
    assert cfg.train.hflip is False              # --no-hflip beats YAML true
    assert cfg.max_epochs == 4 and cfg.seed == 3 and cfg.experiment == "from_yaml"  # YAML
    assert cfg.grace_period is None and cfg.resolved_grace_period == 2  # half of 4
    assert cfg.train.model == "resnet10t" and cfg.start_with_default
    assert cfg.space["dropout"] == 0.1     # YAML space entry
    assert cfg.space["batch_size"] == [32]  # --space beats YAML space
    assert cfg.space["lr"] == WARM_LR  # untouched default entry (a warm start's children)
    assert cfg.space["epochs"] == {"low": 2, "high": 4}  # from YAML's max_epochs


def test_yaml_keys_may_use_dashes(tmp_path):
    cfg = parse_config(["--config", _yaml(tmp_path, "num-samples: 3\nmax-epochs: 2\n")])
    assert cfg.num_samples == 3 and cfg.max_epochs == 2


def test_yaml_resume_and_overwrite_are_ignored(tmp_path):
    cfg = parse_config(["--config", _yaml(tmp_path, "resume: true\noverwrite: true\n")])
    assert cfg.resume is False and cfg.overwrite is False
    assert parse_config(["--resume"]).resume is True


def test_space_flag_list():
    cfg = parse_config(["--space", "batch_size=[16,32]"])
    assert cfg.space["batch_size"] == [16, 32]


def test_space_flag_range_and_fixed():
    cfg = parse_config(["--space", "lr={low: 0.0001, high: 0.01, log: true}",
                        "--space", "dropout=0.2", "--space", "epochs={low: 1, high: 3}",
                        "--max-epochs", "3"])
    assert cfg.space["lr"] == {"low": 1e-4, "high": 1e-2, "log": True}
    assert cfg.space["dropout"] == 0.2
    assert cfg.space["epochs"] == {"low": 1, "high": 3}




def test_space_flag_exponent_notation_from_the_help_text():
    cfg = parse_config(["--space", "lr={low: 1e-4, high: 1e-2, log: true}"])
    assert cfg.space["lr"] == {"low": 1e-4, "high": 1e-2, "log": True}


def test_yaml_exponent_notation(tmp_path):
    cfg = parse_config(["--config", _yaml(tmp_path, "space:\n  weight_decay: "
                                                     "{low: 1e-5, high: 1e-1, log: true}\n")])
    assert cfg.space["weight_decay"] == {"low": 1e-5, "high": 0.1, "log": True}


def test_config_is_frozen():
    cfg = parse_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_samples = 3  # type: ignore[misc]


# ---------------------------------------------------------------- errors


def test_unknown_yaml_key(tmp_path):
    with pytest.raises(UserError) as info:
        parse_config(["--config", _yaml(tmp_path, "num_samples: 2\nlearning_rate: 0.1\n")])
    assert "learning_rate" in str(info.value)


def test_invalid_yaml(tmp_path):
    path = _yaml(tmp_path, "num_samples: [1, 2\nseed: 3\n")
    with pytest.raises(UserError) as info:
        parse_config(["--config", path])
    assert path in str(info.value) and "YAML" in str(info.value)


@pytest.mark.parametrize("text", ["space: [1, 2]\n", "space: 3\n", "train: [lr]\n"])
def test_space_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(UserError, match="must be a mapping"):
        parse_config(["--config", _yaml(tmp_path, text)])


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="mapping"):
        parse_config(["--config", _yaml(tmp_path, "- a\n- b\n")])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        parse_config(["--config", str(missing)])
    assert str(missing) in str(info.value)


def test_bad_value_in_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="max-epochs"):
        parse_config(["--config", _yaml(tmp_path, "max_epochs: 0\n")])


@pytest.mark.parametrize("text, message", [
    ("time_budget_s: 3e3\n", "unknown option(s) time_budget_s"),
    ("max_epochs: '5'\n", "option max_epochs must be a whole number, not '5'")])
def test_wrong_name_or_type_in_yaml_is_a_user_error(tmp_path, text, message):
    with pytest.raises(UserError) as info:
        parse_config(["--config", _yaml(tmp_path, text)])
    assert message in str(info.value)


def test_non_positive_log_lr():
    with pytest.raises(UserError) as info:
        parse_config(["--space", "lr={low: 0, high: 1e-2, log: true}"])
    assert "'lr'" in str(info.value)
    with pytest.raises(UserError) as info:
        parse_config(["--space", "lr={low: 0, high: 0.01, log: true}"])
    assert "'lr'" in str(info.value) and "positive" in str(info.value)


def test_range_with_low_above_high():
    with pytest.raises(UserError, match="swap"):
        parse_config(["--space", "dropout={low: 0.3, high: 0.1}"])


def test_epochs_range_above_max_epochs():
    with pytest.raises(UserError) as info:
        parse_config(["--max-epochs", "5", "--space", "epochs={low: 2, high: 8}"])
    assert "max-epochs" in str(info.value) and "8" in str(info.value)


def test_unknown_scheduler_in_space():
    with pytest.raises(UserError) as info:
        parse_config(["--space", "scheduler=[cosine, warmrestarts]"])
    assert "warmrestarts" in str(info.value)


def test_unknown_space_entry():
    with pytest.raises(UserError, match="not a training setting"):
        parse_config(["--space", "learning_rate=[0.1]"])


def test_space_flag_without_spec():
    with pytest.raises(UserError, match="NAME=SPEC"):
        parse_config(["--space", "lr"])


def test_unknown_timm_model():
    with pytest.raises(UserError) as info:
        parse_config(["--model", "resnet10tt"])
    assert "resnet10tt" in str(info.value) and "resnet10t" in str(info.value)


def test_max_epochs_zero():
    with pytest.raises(UserError, match="max-epochs"):
        parse_config(["--max-epochs", "0"])


@pytest.mark.parametrize("argv, flag", [
    (["--num-samples", "0"], "num-samples"),
    (["--val-fraction", "0.6"], "val-fraction"),
    (["--image-size", "4"], "image-size"),
    (["--experiment", "a/b"], "experiment"),
    (["--experiment", "..", "--overwrite"], "plain folder name"),
    (["--experiment", ".", "--overwrite"], "plain folder name"),
    (["--experiment", "_x"], "plain folder name"),
    (["--experiment", ""], "plain folder name"),
    (["--accum-steps", "0"], "accum-steps"),
    (["--reduction-factor", "1"], "reduction-factor"),
])
def test_other_bad_values(argv, flag):
    with pytest.raises(UserError, match=flag):
        parse_config(argv)


def test_bad_fixed_setting_is_checked_like_the_space():
    with pytest.raises(UserError, match="label_smoothing"):
        parse_config(["--label-smoothing", "1.5"])


# ---------------------------------------------------------------- help and CLI


def test_help_mentions_every_field():
    text = build_parser().format_help()
    names = [f.name for f in dataclasses.fields(SearchConfig) if "help" in f.metadata]
    for name in names + list(OPTIONS):  # every search option and every training setting
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "--config" in text
    assert "--no-hflip" in text


def test_cli_help(tmp_path):
    proc = _cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--max-epochs" in proc.stdout and "--space" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def _assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_cli_max_epochs_zero(tmp_path):
    proc = _cli("--max-epochs", "0", cwd=tmp_path)
    _assert_one_error_line(proc, "--max-epochs")


@pytest.fixture(scope="module")
def missing_data_run(tmp_path_factory):
    """One `--data /nonexistent` run, shared by the tests that look at its outcome."""
    cwd = tmp_path_factory.mktemp("cli_missing_data")
    storage = cwd / "runs"
    proc = _cli("--data", "/nonexistent", "--storage", str(storage), "--num-cpus", "1",
                cwd=cwd)
    return proc, storage


def test_cli_missing_data(missing_data_run):
    proc, _ = missing_data_run
    _assert_one_error_line(proc, "/nonexistent")


def test_cli_missing_data_leaves_no_experiment_behind(missing_data_run):
    proc, storage = missing_data_run
    assert proc.returncode == 2
    folder = storage / "default"
    assert not (folder.exists() and any(folder.iterdir())), list(folder.iterdir())


# ---------------------------------------------------------------- plugins


def test_unknown_plugin_module():
    with pytest.raises(UserError) as info:
        parse_config(["--plugins", "no_such_plugin_module_xyz"])
    assert "no_such_plugin_module_xyz" in str(info.value)


def test_plugin_registers_a_custom_model(tmp_path, monkeypatch):
    (tmp_path / "tiny_cfg_plugin.py").write_text(
        "from timm.models import register_model\n"
        "from timm.models.resnet import resnet10t\n\n"
        "@register_model\n"
        "def tiny_cfg_plugin_net(pretrained=False, **kwargs):\n"
        "    return resnet10t(pretrained=pretrained, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="tiny_cfg_plugin_net"):
        parse_config(["--model", "tiny_cfg_plugin_net"])  # not registered yet
    cfg = parse_config(["--plugins", "tiny_cfg_plugin", "--model", "tiny_cfg_plugin_net"])
    assert cfg.train.plugins == ("tiny_cfg_plugin",) and cfg.train.model == "tiny_cfg_plugin_net"


# ---------------------------------------------------------------- training settings: one source


def test_a_training_flag_fixes_the_setting_and_leaves_the_default_space():
    cfg = parse_config(["--lr", "0.003", "--augment", "strong", "--hflip"])
    assert cfg.train.lr == 0.003 and cfg.train.augment == "strong" and cfg.train.hflip
    assert "lr" not in cfg.space and "weight_decay" in cfg.space


def test_fixing_and_searching_one_setting_at_one_level_is_refused(tmp_path):
    with pytest.raises(UserError, match="both fixed and searched"):
        parse_config(["--lr", "0.003", "--space", "lr=[0.001, 0.01]"])
    path = _yaml(tmp_path, "lr: 0.003\nspace:\n  lr: [0.001, 0.01]\n")
    with pytest.raises(UserError, match="both fixed and searched"):
        parse_config(["--config", path])
    # across levels the flag wins: the YAML searches lr, the flag fixes it
    cfg = parse_config(["--config", _yaml(tmp_path, "space:\n  lr: [0.001, 0.01]\n"),
                        "--lr", "0.002"])
    assert cfg.train.lr == 0.002 and "lr" not in cfg.space


def test_saved_config_reads_back_and_works_as_a_config_file(tmp_path):
    import yaml

    cfg = parse_config(["--label-smoothing", "0.1", "--space", "dropout=[0.0, 0.2]",
                        "--seed", "4"])
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    again = parse_config(["--config", str(saved)])
    assert again.train == cfg.train and again.space == cfg.space and again.seed == 4


def test_every_training_setting_reaches_the_trial():
    """A setting added to TrainConfig needs no other list: it has a flag, a YAML key, and the
    trial's config is the fixed settings with the space's values on top."""
    import dataclasses

    from search.resources import ResourcePlan
    from search.tune import trial_train_config
    from trainables.config import SETTINGS

    cfg = parse_config(["--momentum", "0.8", "--grad-clip", "1.0"])
    fixed = trial_train_config(cfg, ResourcePlan(1, 1.0, 0.0, 0.0, 2))
    assert fixed.momentum == 0.8 and fixed.grad_clip == 1.0 and fixed.seed == cfg.seed
    assert fixed.threads == 1 and fixed.gpu_share == 1.0
    # two trials on one GPU each keep half of the share of its memory for resident images
    halves = trial_train_config(cfg, ResourcePlan(1, 4.0, 0.5, 0.0, 2))
    assert halves.gpu_share == 0.5 and halves.threads == 4
    trial = dataclasses.replace(fixed, **{"lr": 0.004, "scheduler": "step"})
    assert trial.lr == 0.004 and trial.momentum == 0.8
    assert set(OPTIONS) == {n for n, f in SETTINGS.items() if f.metadata["flag"]}
    text = build_parser().format_help()
    assert all("--" + n.replace("_", "-") in text for n in OPTIONS)


def test_the_default_learning_rate_range_follows_what_the_trials_fine_tune_from():
    from trainables.defaults import PRETRAINED_LR, RECOMMENDED

    assert parse_config(["--pretrained"]).space["lr"] == PRETRAINED_LR
    assert parse_config(["--init", "random"]).space["lr"] == DEFAULT_SPACE["lr"]
    # a warm start's children (auto without weights) take smaller steps than random inits
    assert parse_config([]).space["lr"] == parse_config(["--init", "warm"]).space["lr"] == WARM_LR
    assert RECOMMENDED["lr"] <= WARM_LR["high"] < DEFAULT_SPACE["lr"]["high"]
    given = {"low": 1e-3, "high": 1e-2, "log": True}
    assert parse_config(["--pretrained", "--space", "lr={low: 1e-3, high: 1e-2, log: true}"]
                        ).space["lr"] == given  # the user's own range stays
