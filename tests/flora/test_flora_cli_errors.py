"""The one way every llgbm command line reports failure (llgbm_flora.cli_errors)."""

from __future__ import annotations

import pytest
from llgbm_flora.cli_errors import EXIT_ERROR, EXIT_INTERRUPTED, error_line, run_command


def _raise(e: BaseException):
    def f():
        raise e

    return f


def test_errors_are_one_line_and_debug_keeps_the_traceback(capsys):
    assert run_command(lambda: 0) == 0
    assert run_command(lambda: None) == 0
    assert run_command(lambda: 1) == 1
    assert run_command(_raise(ValueError("bad key x\nmore detail"))) == EXIT_ERROR
    assert capsys.readouterr().err == "error: bad key x\n"
    err = PermissionError(13, "Permission denied", "runs/x")
    assert run_command(_raise(err)) == EXIT_ERROR
    assert capsys.readouterr().err == "error: runs/x: Permission denied\n"
    with pytest.raises(ValueError, match="bad"):
        run_command(_raise(ValueError("bad")), debug=True)
    # A bug is not ours to summarise unless the command asks (catch_all), and then it is named.
    with pytest.raises(KeyError):
        run_command(_raise(KeyError("k")))
    assert run_command(_raise(KeyError("k")), catch_all=True) == EXIT_ERROR
    assert capsys.readouterr().err == "error: KeyError: 'k'\n"
    assert error_line(ValueError("")) == "ValueError"


def test_ctrl_c_exits_130_with_the_command_s_hint(capsys):
    code = run_command(_raise(KeyboardInterrupt()), interrupted="interrupted: rerun to resume")
    assert code == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted: rerun to resume\n"
