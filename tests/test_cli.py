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
    assert "data: file does not exist" in line


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


def write_bad_data(folder, kind):
    """A data file of one bad kind; returns (path, the phrase its error must contain)."""
    path = folder / f"{kind}.jsonl"
    path.write_text({"empty": "", "empty_completion": '{"prompt": "a", "completion": ""}\n',
                     "too_long": '{"prompt": "%s", "completion": " x"}\n' % ("alpha " * 400)}[kind])
    return path, {"empty": "the file is empty", "empty_completion": "empty completion",
                  "too_long": "longer than the model context"}[kind]


@pytest.mark.parametrize("kind", ["empty", "empty_completion", "too_long"])
@pytest.mark.parametrize("flag", ["--data", "--eval"])
def test_finetune_bad_data_is_one_line_before_training(tmp_path, capsys, base_dir, task_file, kind, flag):
    bad, phrase = write_bad_data(tmp_path, kind)
    files = {"--data": str(task_file), "--eval": str(task_file), flag: str(bad)}
    argv = ["finetune", "--base", str(base_dir), "--out", str(tmp_path / "o"), *[x for kv in files.items() for x in kv]]
    assert main(argv) == 2
    [line] = err_lines(capsys)
    assert phrase in line and str(bad) in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,config,phrase", [
    ("finetune", "base: b\ndata: d.jsonl\nout: o\nstepz: 3\n", "stepz: unknown key"),
    ("finetune", "base: b\ndata: d.jsonl\nout: o\nsteps: many\n", "steps: Input should be a valid integer"),
    ("merge", "donors: [a]\nout: o\nmethodz: linear\n", "methodz: unknown key"),
    ("merge", "donors: [a]\nout: o\nweights: heavy\n", "weights: Input should be a valid list"),
    ("select", "scores: s.parquet\nk: 2\nout: o.json\nkk: 1\n", "kk: unknown key"),
    ("select", "scores: s.parquet\nk: two\nout: o.json\n", "k: Input should be a valid integer"),
    ("run", "out: o\nbase: b\ndonors: [d]\ntrain: t.jsonl\nstagez: {}\n", "stagez: unknown key"),
])
def test_config_errors_name_the_field(tmp_path, capsys, command, config, phrase):
    path = tmp_path / "c.yaml"
    path.write_text(config)
    assert main([command, "--config", str(path)]) == 2
    [line] = err_lines(capsys)
    assert phrase in line, line


@pytest.mark.parametrize("argv,phrase", [
    (["merge", "--selection", "{tmp}/nope.json", "--out", "{tmp}/m"], "selection: file does not exist: {tmp}/nope.json"),
    (["merge", "--donors", "{tmp}/nope", "--out", "{tmp}/m"], "donors: folder does not exist: {tmp}/nope"),
    (["select", "--scores", "{tmp}/nope/scores.parquet", "--k", "1", "--out", "{tmp}/s.json"],
     "scores: path does not exist: {tmp}/nope/scores.parquet"),
    (["finetune", "--base", "{tmp}/nope", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o"],
     "base: folder does not exist: {tmp}/nope"),
    (["finetune", "--base", "{tmp}", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o"], "base: {tmp} is not a model folder"),
    (["score", "--base", "{tmp}/nope", "--donors", "{tmp}", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o"],
     "base: folder does not exist: {tmp}/nope"),
    (["score", "--base", "{base}", "--donors", "{tmp}/pool", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o"],
     "donors: path does not exist: {tmp}/pool"),
])
def test_missing_files_are_one_line(tmp_path, capsys, base_dir, argv, phrase):
    """A mistyped path is one line naming the field, for every command (a missing --base used to reach
    huggingface_hub, which took it for a repo id and printed four chained tracebacks)."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    assert main([a.format(tmp=tmp_path, base=base_dir) for a in argv]) == 2
    [line] = err_lines(capsys)
    assert phrase.format(tmp=tmp_path) in line, line
    assert "Traceback" not in line


def test_version_prints_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mashup {version('mashup')}"


@pytest.mark.parametrize("field,kind", [("train", "empty"), ("val", "empty"), ("val", "empty_completion"),
                                        ("eval", "too_long"), ("train", "missing")])
def test_run_checks_every_data_file_before_any_stage(tmp_path, capsys, base_dir, pool_dir, task_file, field, kind):
    import yaml

    bad, phrase = (tmp_path / "nope.jsonl", f"{field}: file does not exist") if kind == "missing" else write_bad_data(tmp_path, kind)
    cfg = {"out": str(tmp_path / "run"), "base": str(base_dir), "donors": [str(pool_dir)],
           "train": str(task_file), "val": str(task_file), "eval": str(task_file), field: str(bad)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 2
    [line] = err_lines(capsys)
    assert phrase in line and str(bad) in line, line
    assert not (tmp_path / "run").exists(), "a stage ran before the data was checked"


def test_run_without_val_is_refused_before_any_stage(tmp_path, capsys, base_dir, pool_dir, task_file):
    """Without `val` the run used to train every arm and then crash in the report on an empty eval frame."""
    import yaml

    cfg = {"out": str(tmp_path / "run"), "base": str(base_dir), "donors": [str(pool_dir)],
           "train": str(task_file), "eval": str(task_file)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 2
    [line] = err_lines(capsys)
    assert line.startswith("mashup run: error: val: required"), line
    assert not (tmp_path / "run").exists()
