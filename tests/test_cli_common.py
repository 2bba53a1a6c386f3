"""The error convention of the four CLIs: one line on stderr, exit 1 / 2 / 130, --debug."""
import argparse

import pytest

from trex_hub.cli import common
from trex_hub.cli import download as download_cli
from trex_hub.cli import eval as eval_cli
from trex_hub.cli import extract as extract_cli
from trex_hub.cli import train as train_cli


def parser():
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--n", type=int, default=0)
    common.add_debug_flag(p)
    return p


def run(argv, body, **kw):
    return common.run_cli("prog", lambda: parser().parse_args(argv), body, **kw)


def lines(text):
    return text.strip().splitlines()


def test_failures_usage_errors_and_ctrl_c(capsys):
    assert run([], lambda a: 0) == 0 and capsys.readouterr().err == ""
    assert run(["--n", "3"], lambda a: a.n) == 3

    def broken(args):
        with common.failing_on(KeyError, LookupError):
            raise KeyError("'x' is missing; pass --x")

    assert run([], broken) == 1
    assert lines(capsys.readouterr().err) == ["prog: error: \"'x' is missing; pass --x\""]
    assert run([], lambda a: common.fail("no model named m; see --list")) == 1
    assert lines(capsys.readouterr().err) == ["prog: error: no model named m; see --list"]

    def usage(args):
        raise common.UsageError("--a goes with --b")

    assert run([], usage, suffix=" [rank 1]") == 2
    assert lines(capsys.readouterr().err) == ["prog: error: --a goes with --b [rank 1]"]

    def ctrl_c(args):
        raise KeyboardInterrupt

    assert run([], ctrl_c, interrupted="interrupted; rerun with --resume") == 130
    assert lines(capsys.readouterr().err) == ["prog: interrupted; rerun with --resume"]


def test_argparse_exits_become_codes(capsys):
    assert run(["--n", "x"], lambda a: 0) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert run(["--help"], lambda a: 0) == 0
    assert common.run_cli("prog", lambda: (_ for _ in ()).throw(SystemExit("bad setting")),
                          lambda a: 0) == 2
    assert lines(capsys.readouterr().err) == ["bad setting"]


def test_other_errors_are_not_hidden(capsys):
    """A bug is named with its type (issue 10: one line, no traceback unless --debug)."""
    def bug(args):
        raise ZeroDivisionError("a bug, not a user error")

    assert run([], bug) == 1
    assert "unexpected ZeroDivisionError: a bug, not a user error" in capsys.readouterr().err


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch):
    def broken(args):
        with common.failing_on(OSError):
            open("/nonexistent/dir/file")

    assert run([], broken) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(lines(err)) == 1
    assert run(["--debug"], broken) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err
    assert lines(err)[-1].startswith("prog: error: [Errno 2]")
    monkeypatch.setenv(common.DEBUG_ENV, "1")
    assert run([], broken) == 1 and "Traceback" in capsys.readouterr().err


def test_all_four_clis_use_it(tmp_path, capsys, monkeypatch):
    """Each program: a usage error is one line and 2; Ctrl-C is one line and 130."""
    import trex_hub.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    cases = [
        (download_cli.main, ["trex", "--json"], "trex-download: error: --json goes with"),
        (extract_cli.main, ["m", str(tmp_path), "-o", str(tmp_path / "f.csv")],
         "trex-extract: error: output"),
        (eval_cli.main, ["run", "--format", "imagefolder", "--out", str(tmp_path), "--models",
                         "m"], "trex-eval run: error: --format imagefolder needs --data ROOT"),
        (train_cli.main, ["export", str(tmp_path / "missing.pth"), str(tmp_path / "o")],
         "trex-train export: error: "),
    ]
    for main, argv, start in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == (1 if main is train_cli.main else 2), err
        assert len(lines(err)) == 1 and err.startswith(start), err
    monkeypatch.setattr(trex_hub.api, "load", interrupted)
    assert extract_cli.main(["m", str(tmp_path), "-o", str(tmp_path / "f.npy"), "-q"]) == 130
    assert lines(capsys.readouterr().err) == [
        "trex-extract: interrupted; committed chunks are kept: rerun with --resume to continue"]


def test_unexpected_errors_still_end_in_one_line(capsys):
    def boom(args):
        raise RuntimeError("something nobody foresaw")

    assert run([], boom) == 1
    err = capsys.readouterr().err
    assert lines(err) == ["prog: error: unexpected RuntimeError: something nobody foresaw (rerun "
                          "with --debug for the traceback)"]
    assert run(["--debug"], boom) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and lines(err)[-1] == (
        "prog: error: unexpected RuntimeError: something nobody foresaw")


def test_help_formatter_shows_only_useful_defaults():
    p = argparse.ArgumentParser(prog="prog", formatter_class=common.HelpFormatter)
    p.add_argument("-o", required=True, help="out")
    p.add_argument("--flag", action="store_true", help="a flag")
    p.add_argument("--no-x", dest="x", action="store_false", help="no x")
    p.add_argument("-j", type=int, default=None, help="threads (default: one per core)")
    p.add_argument("-b", type=int, default=32, help="batch")
    text = " ".join(p.format_help().split())
    assert "-o O out" in text and "--flag a flag" in text and "--no-x no x" in text
    assert "threads (default: one per core)" in text and "batch (default: 32)" in text
    assert text.count("default") == 2


EXIT_SCRIPT = r'''
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from trex_hub.cli.common import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")

threading.Thread(target=late).start()
# a pool never shut down (torch.compile's leaves one): its idle workers end only when threading's
# exit callbacks wake them, which a normal exit runs before it waits for the threads
pool = ThreadPoolExecutor(2)
pool.submit(time.sleep, 0.1)
print("buffered line")  # stdout is a file here: block-buffered until flushed
exit_now(int(sys.argv[2]))
'''


@pytest.mark.parametrize("clean", ["", "1"])
def test_exit_now_keeps_what_a_normal_exit_does(tmp_path, clean):
    import os
    import subprocess
    import sys

    script = tmp_path / "prog.py"
    script.write_text(EXIT_SCRIPT)
    env = dict(os.environ, TREX_HUB_CLEAN_EXIT=clean)
    env.pop("PYTHONUNBUFFERED", None)  # so the line really waits in a buffer
    with open(tmp_path / "stdout", "wb") as fh:
        rc = subprocess.run([sys.executable, str(script), str(tmp_path), "3"], stdout=fh,
                            env=env, timeout=30).returncode
    assert rc == 3
    assert (tmp_path / "stdout").read_text() == "buffered line\n"
    assert (tmp_path / "thread").read_text() == "done"  # non-daemon threads are waited for
    assert (tmp_path / "atexit").read_text() == "ran"


def test_console_scripts_are_the_programs():
    import configparser
    from importlib import import_module
    from pathlib import Path

    from trex_hub.cli import scripts

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    entries = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(entries) == {"trex-download", "trex-extract", "trex-eval", "trex-train"}
    for prog, target in entries.items():
        module, func = target.split(":")
        assert import_module(module) is scripts and callable(getattr(scripts, func))
        # each runs the program of its name, which the console script then ends with
        assert import_module(f"trex_hub.cli.{func}").PROG == prog
