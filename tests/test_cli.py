"""User errors: exit 2 with one clear line on stderr, never a traceback, before any expensive work."""
import pytest

from engine.cli import main


def err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: x\ndonors: [y]\ndata: d.jsonl\nout: o\nactorz: 2\n")
    assert main(["score", "--config", str(cfg)]) == 2
    [line] = err_lines(capsys)
    assert "actorz: unknown key" in line


def test_wrong_type_names_the_field(tmp_path, capsys):
    assert main(["score", "--base", "b", "--donors", "d", "--data", "x.jsonl", "--out", "o", "--actors", "0"]) == 2
    [line] = err_lines(capsys)
    assert "actors:" in line and "greater than or equal to 1" in line


def test_missing_required_field(capsys):
    assert main(["score", "--base", "b"]) == 2
    [line] = err_lines(capsys)
    assert "donors: Field required" in line


def test_missing_data_file(tmp_path, capsys, base_dir, pool_dir):
    assert main(["score", "--base", str(base_dir), "--donors", str(pool_dir), "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    [line] = err_lines(capsys)
    assert "data file not found" in line


@pytest.mark.parametrize("content,phrase", [("", "empty"), ('{"prompt": "a", "completion": ""}\n', "empty completion"),
                                            ('{"prompt": "a"}\n', "'completion' must be a string"),
                                            ("not json\n", "not valid JSON")])
def test_bad_data(tmp_path, capsys, base_dir, pool_dir, content, phrase):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert main(["score", "--base", str(base_dir), "--donors", str(pool_dir), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    [line] = err_lines(capsys)
    assert phrase in line


def test_prompt_longer_than_context(tmp_path, capsys, base_dir, pool_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "%s", "completion": " x"}\n' % ("alpha " * 400))
    assert main(["score", "--base", str(base_dir), "--donors", str(pool_dir), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "longer than the model context" in err_lines(capsys)[0]
