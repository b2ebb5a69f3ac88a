import subprocess
import sys

from oe_agent.cli import main


def test_unknown_verb_is_one_line_error(capsys):
    try:
        main(["no-such-verb"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert err.startswith("oe-agent: ") and err.count("\n") == 1


def test_version_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "oe_agent", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("oe-agent ")
