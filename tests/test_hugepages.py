"""The huge-page re-execution of the training/benchmark commands (nanodet_jax.hugepages)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from nanodet_jax.hugepages import (
    ENV_SWITCH,
    MARKER,
    hugepage_environ,
    reexec_with_hugepages,
    thp_mode,
)

GOOD = {"thp": "madvise", "glibc": (2, 36)}


@pytest.mark.parametrize("thp", ["always", "madvise"])
def test_environ_adds_the_tunable_when_huge_pages_apply(thp):
    env = hugepage_environ({"PATH": "/bin"}, thp, (2, 35))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", MARKER: "1"}


def test_environ_keeps_other_tunables():
    env = hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **GOOD)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, thp, glibc", [
    ({}, "never", (2, 36)),                                     # THP off in the kernel
    ({}, None, (2, 36)),                                        # no THP file (not Linux)
    ({}, "madvise", (2, 34)),                                   # glibc without the tunable
    ({}, "madvise", None),                                      # not glibc (musl, macOS)
    ({ENV_SWITCH: "0"}, "always", (2, 36)),                     # switched off
    ({MARKER: "1"}, "always", (2, 36)),                         # already re-executed
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always", (2, 36)),  # the user's choice
])
def test_environ_is_none_when_it_does_not_apply(environ, thp, glibc):
    assert hugepage_environ(environ, thp, glibc) is None


def test_switch_1_skips_the_checks():
    env = hugepage_environ({ENV_SWITCH: "1"}, None, None)
    assert env is not None and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(str(f)) == "madvise"
    assert thp_mode(str(tmp_path / "missing")) is None


SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], flush=False)
    from nanodet_jax.hugepages import reexec_with_hugepages
    reexec_with_hugepages()
    print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"))
""")


def _run(tmp_path, switch: str) -> list[list[str]]:
    script = tmp_path / "cmd.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", MARKER)}
    env[ENV_SWITCH] = switch
    out = subprocess.run([sys.executable, str(script), "a", "b c"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return [line.split(" ", 3) for line in out.splitlines()]


@pytest.mark.skipif(sys.platform != "linux", reason="execve re-execution is Linux-only")
def test_command_is_reexecuted_once_with_the_tunable(tmp_path):
    lines = _run(tmp_path, "1")
    # the first image's unflushed output is flushed before execve; same pid and arguments
    assert [ln[0] for ln in lines] == ["start", "start", "running"]
    assert len({ln[1] for ln in lines}) == 1
    assert lines[0][2] == "-" and lines[1][3] == lines[0][3] == "['a', 'b c']"
    assert lines[1][2] == lines[2][2] == "glibc.malloc.hugetlb=1"


def test_switch_0_runs_as_is(tmp_path):
    lines = _run(tmp_path, "0")
    assert [ln[0] for ln in lines] == ["start", "running"] and lines[1][2] == "-"


def test_in_process_call_does_not_reexecute_when_switched_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    reexec_with_hugepages()  # returns: pytest keeps running
