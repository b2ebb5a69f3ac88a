"""`oe-agent run -c FILE` refuses bad input with one line, before touching any kernel state."""
from oe_agent.cli import main


def run(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def test_run_needs_config(capsys):
    rc, err = run(capsys, "run")
    assert rc == 2 and err.startswith("oe-agent: ") and "-c" in err and err.count("\n") == 1


def test_run_bad_config_names_file_and_key(capsys, tmp_path):
    f = tmp_path / "oe.toml"
    f.write_text('[agent]\ndataplane = "fast"\n')
    rc, err = run(capsys, "run", "-c", str(f))
    assert rc == 2 and err == f"oe-agent: {f}: agent.dataplane: 'fast' is not one of auto, kernel, userspace\n"


def test_run_missing_config(capsys, tmp_path):
    rc, err = run(capsys, "run", "-c", str(tmp_path / "nope.toml"))
    assert rc == 2 and "cannot read config" in err and err.count("\n") == 1


def test_run_bad_policies_stop_before_any_state(capsys, tmp_path):
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "private").write_text("192.0.2.0/24\n")
    (pol / "clear").write_text("# x\n192.0.2.0/24\n")
    f = tmp_path / "oe.toml"
    f.write_text(f'[agent]\naddresses = ["192.0.2.1"]\npolicies = "pol"\nsocket = "s.sock"\n')
    rc, err = run(capsys, "run", "-c", str(f))
    assert rc == 2 and f"{pol}/private:1" in err and f"{pol}/clear:2" in err and err.count("\n") == 1
    assert not (tmp_path / "s.sock").exists()
    (pol / "clear").unlink()
    f.write_text(f'[agent]\naddresses = ["192.0.2.1"]\npolicies = "nodir"\n')
    rc, err = run(capsys, "run", "-c", str(f))
    assert rc == 2 and "policies directory does not exist" in err
