"""Config validation: a bad config fails at composition/validation time, naming the key."""
import pytest

from alignbench.cli import compose, main
from alignbench.config import ConfigError, to_config
from alignbench.runner import validate


def test_default_config_is_valid():
    cfg = to_config(compose([]))
    assert cfg.data.name == "hh_synth" and cfg.model.kind == "tiny" and cfg.stages.pm.epochs == 1.0
    assert cfg.model.trust_remote_code is False


def test_unknown_key_is_named():
    with pytest.raises(Exception) as e:
        compose(["stages.pm.learning_rate=0.1"])
    assert "learning_rate" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("stages.pm.lr=-1", "stages.pm.lr"),
    ("model.num_heads=3", "model.hidden_size"),
    ("data.split.train=0.9", "data.split"),
    ("data.bad_rows=ignore", "data.bad_rows"),
    ("stages.pi0.mode=magic", "stages.pi0.mode"),
    ("train.temperature=0", "train.temperature"),
    ("data.synth.n_pairs=0", "data.synth.n_pairs"),
    ("budget.pm_calls=0", "budget.pm_calls"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        to_config(compose([override]))
    assert key in str(e.value)


def test_gold_judge_needs_synthetic_data():
    with pytest.raises(ConfigError, match="eval.judge"):
        validate(compose(["data=hh_rlhf", "data.path=/nowhere", "eval.judge=gold"]))


def test_unknown_method_lists_registered_ones():
    with pytest.raises(ConfigError, match="registered"):
        validate(compose(["method.name=nope"]))


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["data-stats", "stages.pm.lr=-1"]) == 2
    assert "stages.pm.lr: must be > 0" in capsys.readouterr().err


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="paths.sweep_dir: cannot write"):
        validate(compose([f"paths.sweep_dir={blocker}/sweep", f"paths.cache_dir={tmp_path}/cache"]))
    assert blocker.read_text() == "not a directory"  # nothing already written is touched


def test_every_method_yaml_lists_the_shared_method_fields():
    """Hydra checks a multirun's overrides against the default method as well, so a sweep like
    `-m method=context_distilled,dpo method.eval_every=10` composes only if every method YAML
    lists MethodConfig's fields."""
    import dataclasses
    from pathlib import Path

    import yaml

    from alignbench.methods import MethodConfig
    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    for path in sorted((Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")):
        missing = shared - set(yaml.safe_load(path.read_text()))
        assert not missing, f"{path.name} lacks {sorted(missing)}"
    cfg = to_config(compose(["method=context_distilled", "method.eval_every=10"]))
    assert cfg.method["eval_every"] == 10
