"""Signals at any moment (neox_jax/interrupts.py), the launcher's forwarding of them, and how it ends the others
when one process fails. Training's own stop on a signal is tested in tests/test_loop.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from neox_jax import atomic, interrupts

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
LAUNCH = [sys.executable, "-m", "neox_jax.cli", "launch"]


def test_deferred_hands_a_library_caller_the_signal():
    got = []
    with interrupts.deferred(got.append):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler between bytecodes
    assert got == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_partial_outputs_are_discarded_and_finished_ones_kept(tmp_path):
    done = tmp_path / "done.bin"
    with atomic.atomic_path(done) as tmp:
        tmp.write_text("whole")
    writing = atomic.temp_path(tmp_path / "half.bin")
    writing.write_text("half")
    staging = atomic.partial(tmp_path / ".partial")
    (staging / "params").mkdir(parents=True)
    atomic.discard_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.bin"] and done.read_text() == "whole"


COMPILE = textwrap.dedent("""
    import sys
    from neox_jax import interrupts
    interrupts.install("neox-jax test")
    import jax, jax.numpy as jnp
    def f(x):
        for i in range(600):
            x = jnp.sin(x @ x.T) + i
        return x
    lowered = jax.jit(f).lower(jnp.ones((32, 32)))
    print("compiling", flush=True)
    lowered.compile()
    print("compiled", flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_compile_ends_the_process_at_once(sig):
    proc = subprocess.Popen([sys.executable, "-c", COMPILE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline() == "compiling\n"
    time.sleep(0.5)  # inside XLA's compile (several seconds on this program)
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 2.0
    assert proc.returncode == 128 + sig and out == ""  # it never finished compiling
    assert err.splitlines()[-1] == f"neox-jax test: stopped by {sig.name}"
    assert "Traceback" not in err


def _launch(script: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, "--local", "2", *flags, "--", sys.executable, "-c", textwrap.dedent(script)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_launcher_forwards_a_signal_and_reports_no_failure():
    proc = _launch("""
        import time
        from neox_jax import interrupts
        interrupts.install("neox-jax child")
        print("ready", flush=True)
        time.sleep(120)
    """)
    ready = 0
    while ready < 2:
        line = proc.stdout.readline()
        assert line, f"the launcher ended before its processes were ready (status {proc.wait()})"  # not a spin
        ready += line == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert out.count("neox-jax child: stopped by SIGINT") == 2 and "neox-jax launch" not in out


def test_a_failed_process_ends_the_others_without_waiting_out_the_grace():
    proc = _launch("""
        import os, sys, time
        print("ready", flush=True)
        if os.environ["NEOX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(120)  # as a process blocked on its dead peer
    """, "--grace", "60")
    start = time.time()
    out, _ = proc.communicate(timeout=60)
    assert time.time() - start < 15  # the launcher's stop time (5 s), not the grace, nor the sleep
    assert proc.returncode == 3, out
    assert "process 1 (host localhost" in out and "exited with status 3" in out
    assert "process 0 was killed by SIGTERM" in out
