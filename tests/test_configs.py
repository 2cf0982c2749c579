"""Every YAML in configs/ is headed by the command that runs it, names its schema, and validates (torchtune-style)."""
import importlib
from pathlib import Path

import pytest

from engine.config import load_yaml, validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "mashup" in lines[0] or "ray job submit" in lines[0] or "python -m" in lines[0], (
        "first line must give the command that runs this config"
    )
    schema = next((ln.split(":", 1)[1].strip() for ln in lines[:5] if ln.startswith("# schema:")), None)
    assert schema, "a '# schema: module:Class' line must follow the command"
    module, cls = schema.split(":")
    validate(getattr(importlib.import_module(module), cls), load_yaml(path), str(path))
