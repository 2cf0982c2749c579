"""Every YAML in configs/ is headed by the command that runs it, names its schema, and validates (torchtune-style),
down to its nested sections: a run's score/select/merge/finetune sections per arm, and a scorer's backend_options."""
import importlib
from pathlib import Path

import pytest

from engine.core.config import load_yaml, validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
COMMANDS = ("mashup", "ray job submit", "python -m")


def test_there_are_configs():
    assert CONFIGS


def header_ok(first_line: str) -> bool:
    """A comment line that names the command (the old inline check read `a and b or c or d`, so a line starting
    without '# ' passed as soon as it mentioned `python -m`)."""
    return first_line.startswith("# ") and any(command in first_line for command in COMMANDS)


def test_header_check_needs_the_comment_marker():
    assert header_ok("# mashup run --config x.yaml")
    assert not header_ok("python -m bench.bench_recycling --config x.yaml")
    assert not header_ok("# a config")


def nested_sections(config) -> None:
    """What loading alone cannot check: each arm's sections laid over the run's (the rules between fields), and
    a scorer's backend_options, which depend on the backend chosen."""
    from engine.run import RunConfig
    from engine.scoring import ScoreConfig

    if isinstance(config, ScoreConfig):
        config.backend_opts()
        return
    if not isinstance(config, RunConfig):
        if not hasattr(config, "arms"):
            return
        # BenchConfig: the same sections, handed to one RunConfig per target
        config = RunConfig(out=Path("o"), base="b", donors=["d"], train=Path("t.jsonl"), val=Path("v.jsonl"),
                           **config.plan())
    config.score_config().backend_opts()
    for arm in config.arms:
        if arm.init == "merge":
            config.select_config(arm, config.sweep.seeds[0])
            config.merge_config(arm, config.sweep.seeds[0])
        for lr in config.lrs():
            config.finetune_config(arm, lr, config.sweep.seeds[0])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    lines = path.read_text().splitlines()
    assert header_ok(lines[0]), "first line must give the command that runs this config"
    schema = next((ln.split(":", 1)[1].strip() for ln in lines[:5] if ln.startswith("# schema:")), None)
    assert schema, "a '# schema: module:Class' line must follow the command"
    module, cls = schema.split(":")
    config = validate(getattr(importlib.import_module(module), cls), load_yaml(path), str(path))
    nested_sections(config)


def test_a_bad_nested_key_is_caught(tmp_path):
    """The nested check can fail: a typo inside a run's finetune section, and inside backend_options."""
    from engine.core.errors import ConfigError
    from engine.run import RunConfig
    from engine.scoring import ScoreConfig

    with pytest.raises(ConfigError, match=r"finetune\.lora\.rank: unknown key"):
        validate(RunConfig, {"out": "o", "base": "b", "donors": ["d"], "train": "t", "val": "v",
                             "finetune": {"lora": {"rank": 8}}})
    with pytest.raises(ConfigError, match=r"arms\.0\.select\.kk: unknown key"):
        validate(RunConfig, {"out": "o", "base": "b", "donors": ["d"], "train": "t", "val": "v",
                             "arms": [{"name": "a", "select": {"kk": 2}}]})
    # a rule between fields shows once an arm's overrides meet the run's section
    run = validate(RunConfig, {"out": "o", "base": "b", "donors": ["d"], "train": "t", "val": "v",
                               "arms": [{"name": "a", "select": {"penalty": 1.0}}]})
    with pytest.raises(ConfigError, match="select: penalty: applies only to weighting mwa"):
        nested_sections(run)
    score = validate(ScoreConfig, {"base": "b", "donors": ["d"], "data": "d", "out": "o",
                                   "backend_options": {"max_residentt": 4}})
    with pytest.raises(ConfigError, match="max_residentt"):
        nested_sections(score)


def test_a_dumped_run_config_reads_back_the_same(tmp_path):
    """Arms and sections dump what was set, so a saved config (config.json, a Tune trial, a bench script's dump)
    validates again and gives the same stage configs, not an arm that overrides the run with defaults."""
    from engine.run import ArmSpec, RunConfig

    cfg = validate(RunConfig, {"out": "o", "base": "b", "donors": ["d"], "train": "t", "val": "v",
                               "select": {"k": 3, "weighting": "mwa"}, "score": {"samples": 64},
                               "arms": [{"name": "m", "select": {"penalty": 2.0}}, {"name": "s", "init": "none"}]})
    for dumped in (cfg.model_dump(), __import__("json").loads(cfg.model_dump_json())):
        again = RunConfig.model_validate(dumped)
        arm = again.arms[0]
        assert again.select_config(arm, 0) == cfg.select_config(cfg.arms[0], 0)
        assert again.score_config() == cfg.score_config()
    arm = ArmSpec.model_validate(ArmSpec(name="x", select={"seed": 4}).model_dump())
    assert arm.select.model_fields_set == {"seed"} and arm.merge.model_fields_set == set()
