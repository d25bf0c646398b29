"""Commands from plugins: the ``register_commands`` hook, the CLI's rules for plugin
commands (one-line user errors, clashes, broken plugins), lazy loading, and the message
for a command whose plugin is not there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moeframe.cli.main import build_parser, main
from moeframe.errors import PluginError
from moeframe.plugins import PluginWarning, get_host

ROOT = Path(__file__).resolve().parent.parent

GREET = """
import argparse
from moeframe import hookimpl
from moeframe.errors import InputError

moeframe_plugin_api = 3

def add_arguments(parser):
    parser.add_argument("who")
    parser.add_argument("--times", type=int, default=1)

def run(args):
    if args.who == "nobody":
        raise InputError("greet: nobody to greet; name someone")
    print(" ".join([f"hello {args.who}"] * args.times))
    return 3 if args.who == "three" else None

@hookimpl
def register_commands(register):
    register("greet", run, help="greet someone", add_arguments=add_arguments)
    register("greet-lazy", "greet_cli:run", help="greet lazily", add_arguments="greet_cli:add_arguments")
"""

GREET_CLI = """
import sys
print("greet_cli imported", file=sys.stderr)

def add_arguments(parser):
    parser.add_argument("--loud", action="store_true")

def run(args):
    print("HELLO" if args.loud else "hello")
    return 0
"""


def _plugin(name: str, body: str) -> str:
    return f"from moeframe import hookimpl\n\n@hookimpl\ndef register_commands(register):\n    {body}\n"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors (one line, status 2) and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeframe: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def greet(fake_dists):
    fake_dists.add("moeframe-greet", "1.0", {"greet_plugin": GREET, "greet_cli": GREET_CLI}, {"greet": "greet_plugin"})
    return fake_dists


def test_a_plugin_command_runs_with_its_arguments_and_exit_status(greet, capsys):
    assert cli(capsys, "greet", "world", "--times", "2") == (0, "hello world hello world\n", "")
    code, out, _ = cli(capsys, "greet", "three")
    assert (code, out) == (3, "hello three\n")  # the command's exit status; None counts as 0
    code, _, err = cli(capsys, "greet", "nobody")
    assert code == 2 and one_line_error(err) == "moeframe: error: greet: nobody to greet; name someone"
    code, _, err = cli(capsys, "greet", "world", "--time", "2")  # no abbreviations, one line
    assert code == 2 and "unrecognized arguments: --time" in err and len(err.strip().splitlines()) == 1
    assert cli(capsys, "greet-lazy", "--loud")[:2] == (0, "HELLO\n")


def test_help_lists_plugin_commands_without_importing_them(greet, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0
    assert re.search(r"greet\s+greet someone", out) and re.search(r"greet-lazy\s+greet lazily", out)
    assert re.search(r"\brun\s+run the configured stack", out)
    assert "greet_cli imported" not in err and "greet_cli" not in sys.modules  # named as a string: not imported
    with pytest.raises(SystemExit):
        main(["greet-lazy", "--help"])
    out, err = capsys.readouterr()
    assert "--loud" in out and "greet_cli imported" in err


def test_plugins_lists_each_plugins_commands(greet, capsys):
    code, out, _ = cli(capsys, "plugins")
    assert code == 0 and "moeframe-greet 1.0: ok" in out and "  commands: greet, greet-lazy" in out
    assert "  commands: check, explain, list, plugins, run" in out  # moeframe's own, through the same hook
    data = json.loads(cli(capsys, "plugins", "--json")[1])
    record = next(p for p in data["plugins"] if p["name"] == "moeframe-greet")
    assert record["commands"] == ["greet", "greet-lazy"] and record["hooks"] == ["register_commands"]
    assert data["classes_checked"] is False


def test_a_command_named_like_a_builtin_is_refused_and_the_builtin_kept(fake_dists, capsys):
    fake_dists.add(
        "moeframe-usurper",
        "0.3",
        {"usurper": _plugin("usurper", 'register("run", print, help="mine")')},
        {"usurper": "usurper"},
    )
    message = "command 'run' from moeframe-usurper 0.3 clashes with moeframe's builtin command 'run'"
    with pytest.warns(PluginWarning, match=re.escape(message)):
        host = get_host()
    assert host.commands.get("run").provider.builtin
    record = next(r for r in host.plugins if r.name == "moeframe-usurper")
    assert record.commands == [] and message in record.errors[0]
    code, out, _ = cli(capsys, "run", "qwen3-moe", "--tokens", "2", "--repeat", "1")
    assert code == 0 and "moeframe-usurper" not in out
    code, out, _ = cli(capsys, "plugins")
    assert "moeframe-usurper 0.3: failed" in out and f"error: {message}" in out


def test_two_plugins_claiming_one_command_name_both(fake_dists, capsys):
    for dist in ("moeframe-left", "moeframe-right"):
        module = dist.replace("-", "_")
        fake_dists.add(dist, "2.0", {module: _plugin(module, 'register("frob", print, help="frob")')}, {"p": module})
    with pytest.warns(
        PluginWarning, match="command 'frob' is registered by both moeframe-left 2.0 and moeframe-right 2.0"
    ):
        code, _, err = cli(capsys, "frob")
    assert code == 2
    assert one_line_error(err) == (
        "moeframe: error: command 'frob' is registered by both moeframe-left 2.0 and moeframe-right 2.0; it is "
        "unusable until one of them is uninstalled (or left out with MOEFRAME_PLUGINS)"
    )
    records = {r.name: r for r in get_host().plugins}
    assert not records["moeframe-left"].ok and not records["moeframe-right"].ok
    code, out, _ = cli(capsys, "plugins")
    assert code == 0 and "conflict: command 'frob' is registered by both" in out


def test_strict_plugins_make_a_clash_fatal(fake_dists, capsys, monkeypatch):
    fake_dists.add(
        "moeframe-usurper",
        "0.3",
        {"usurper": _plugin("usurper", 'register("list", print, help="mine")')},
        {"usurper": "usurper"},
    )
    monkeypatch.setenv("MOEFRAME_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="clashes with moeframe's builtin command 'list'"):
        get_host()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('register("Bad Name", print, help="x")', "command name 'Bad Name' must be lower case letters"),
        ('register("frob", print, help="")', "help must be a one-line description"),
        ('register("frob", "no_colon", help="x")', "run 'no_colon' must be 'module:function'"),
        ('register("frob", print)', "missing 1 required keyword-only argument: 'help'"),
    ],
)
def test_a_bad_registration_skips_the_plugin_with_its_name(fake_dists, capsys, body, message):
    fake_dists.add("moeframe-bad", "0.1", {"bad_plugin": _plugin("bad", body)}, {"bad": "bad_plugin"})
    with pytest.warns(
        PluginWarning,
        match=rf"moeframe plugin 'moeframe-bad' 0.1 was skipped: hook register_commands "
        rf"raised \w+: .*{re.escape(message)}",
    ):
        host = get_host()
    assert host.commands.get("frob") is None


BROKEN_ARGUMENTS = _plugin("broken", 'register("frob", "broken_impl:run", help="x", add_arguments="broken_impl:nope")')


def test_a_broken_plugin_breaks_only_its_own_command(fake_dists, capsys):
    fake_dists.add("moeframe-crashes", "0.1", {"crash_plugin": "raise RuntimeError('boom')\n"}, {"c": "crash_plugin"})
    fake_dists.add(
        "moeframe-broken",
        "0.2",
        {"broken_plugin": BROKEN_ARGUMENTS, "broken_impl": "def run(args):\n    return 'yes'\n"},
        {"b": "broken_plugin"},
    )
    with pytest.warns(PluginWarning, match="moeframe-crashes"), pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and re.search(r"\bfrob\s+x", capsys.readouterr().out)
    code, _, err = cli(capsys, "frob")
    assert code == 2 and one_line_error(err) == (
        "moeframe: error: command 'frob' from moeframe-broken 0.2 cannot be loaded: its add_arguments "
        "'broken_impl:nope' failed: AttributeError: module 'broken_impl' has no attribute 'nope'"
    )
    code, out, _ = cli(capsys, "list", "presets")
    assert code == 0 and "qwen3-moe" in out


def test_a_command_that_returns_no_exit_status_is_named(fake_dists, capsys):
    fake_dists.add(
        "moeframe-yes",
        "0.2",
        {"yes_plugin": _plugin("yes", 'register("yes", lambda args: "yes", help="y")')},
        {"y": "yes_plugin"},
    )
    code, _, err = cli(capsys, "yes")
    assert code == 2 and one_line_error(err) == (
        "moeframe: error: command 'yes' from moeframe-yes 0.2 returned 'yes' where an exit status (an int, or None "
        "for 0) was expected"
    )


def test_a_builtin_command_parses_without_loading_any_plugin():
    from moeframe.plugins import manager

    args = build_parser(["run", "qwen3-moe", "--repeat", "2"]).parse_args(["run", "qwen3-moe", "--repeat", "2"])
    assert args.repeat == 2 and args.command_entry.provider.builtin
    assert manager._host is None  # no plugin loaded to parse a builtin command


def test_help_imports_neither_torch_nor_any_command_module():
    code = (
        "import sys; from moeframe.cli.main import build_parser; build_parser([]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers') "
        "or m.startswith(('moeframe.cli.run', 'moeframe_bench.cli', 'moeframe_bench.measure', 'moeframe_bench.e2e', "
        "'moeframe_triton.cli'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MOEFRAME_DISABLE_PLUGIN_AUTOLOAD": "1"},
            (
                "moeframe: error: `moeframe bench` comes with the plugin moeframe-bench, which is installed but not "
                "loaded: MOEFRAME_DISABLE_PLUGIN_AUTOLOAD is set"
            ),
        ),
        (
            {"MOEFRAME_PLUGINS": "moeframe-expert-stats"},
            (
                "moeframe: error: `moeframe bench` comes with the plugin moeframe-bench, which is installed but not "
                "loaded: MOEFRAME_PLUGINS allows only moeframe-expert-stats"
            ),
        ),
    ],
)
def test_bench_without_its_plugin_loaded_says_why(capsys, monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = cli(capsys, "bench", "qwen3-moe")
    assert code == 2 and one_line_error(err) == message


def test_bench_not_installed_says_how_to_get_it(capsys, monkeypatch):
    import moeframe.cli.main as cli_main

    monkeypatch.setattr(cli_main, "_installed", lambda dist: False)
    monkeypatch.setenv("MOEFRAME_PLUGINS", "moeframe-expert-stats")
    code, _, err = cli(capsys, "bench", "qwen3-moe", "--tokens", "1")
    assert code == 2 and one_line_error(err) == (
        "moeframe: error: `moeframe bench` comes with the plugin distribution moeframe-bench, which is not installed; "
        "in a moeframe checkout: pip install -e plugins/moeframe-bench (or ./dev.sh setup)"
    )
    code, _, err = cli(capsys, "nonsense")
    assert code == 2 and "invalid choice: 'nonsense'" in err  # not a known plugin's command: argparse's message


def test_the_repositorys_plugins_register_bench_e2e_and_tune(capsys):
    host = get_host()
    providers = {e.name: e.provider.name for e in host.commands.entries()}
    assert providers["bench"] == providers["e2e"] == "moeframe-bench" and providers["tune"] == "moeframe-triton"
    assert {e.name for e in host.commands.entries() if e.provider.builtin} == {
        "plugins",
        "list",
        "explain",
        "run",
        "check",
    }


def test_dev_sh_installs_only_extras_that_some_distribution_declares():
    """A misspelled extra in dev.sh would install nothing, silently."""
    text = (ROOT / "dev.sh").read_text()
    wanted = {e for group in re.findall(r'\n\s+setup "([\w,]*)"', text) for e in group.split(",") if e}
    declared: set[str] = set()
    for pyproject in [ROOT / "pyproject.toml", *ROOT.glob("plugins/*/pyproject.toml")]:
        section = pyproject.read_text().partition("[project.optional-dependencies]")[2].partition("\n[")[0]
        declared |= set(re.findall(r"^([\w.-]+)\s*=", section, re.M))
    assert wanted and wanted <= declared, wanted - declared
    assert "plot" in wanted and "peers" in wanted  # moeframe-bench's extras: `./dev.sh bench` needs them


def test_python_m_e2e_still_parses_like_moeframe_e2e():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEFRAME_")}
    proc = subprocess.run(
        [sys.executable, "-m", "moeframe_bench.e2e", "--dtype", "float99"],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "moeframe: error: --dtype: unknown dtype 'float99'; choose from float32, bfloat16, float16"
    )


def test_the_old_bench_module_still_works_with_a_deprecation_warning():
    import importlib

    import moeframe_bench.measure

    sys.modules.pop("moeframe.bench", None)
    with pytest.warns(DeprecationWarning, match="import moeframe_bench instead"):
        old = importlib.import_module("moeframe.bench")
    assert old.run_benchmark is moeframe_bench.measure.run_benchmark
    proc = subprocess.run(
        [sys.executable, "-m", "moeframe.bench.e2e", "--dtype", "float99"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "is now `moeframe e2e`" in proc.stderr and "Traceback" not in proc.stderr
