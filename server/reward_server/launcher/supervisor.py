"""Keeps tritonserver serving: restarts it when one of its python-backend stub processes dies.

Triton 2.51 does not restart a python model's stub process that died (killed, out of memory): every
later request to that model fails with "Stub process ... is not healthy" while the server still
reports the model ready. The supervisor watches the stubs of a server that has become ready; when a
model that Triton still calls ready has fewer live stubs than before (twice in a row, 0.5 s apart),
it restarts the whole server (model control is off by default, so there is no narrower way to
reload). An unload (Triton no longer calls the model ready) or a reload (new stubs replace the old
ones) is not a fault.

`reward-server` (serve.py) runs tritonserver under `supervise`.
While it restarts, its ports are closed: clients see "unavailable" and retry. A server that exits on
its own after having been ready is restarted too (after a growing pause when it keeps exiting soon
after becoming ready: restart_delay); one that never became ready is not (that is a configuration
error, and its exit status is returned).

Each start gets its own python-backend shared-memory prefix (`--backend-config=python,
shm-region-prefix-name=...`); the regions a dead server leaves in /dev/shm (a crashed one never
unlinks them: ~100 MiB a crash) are removed before the restart, and after the last exit.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

STUB = b"triton_python_backend_stub"
STOP_GRACE_S = 15
# A server that exits within STABLE_S of becoming ready, again and again (a poison request its clients
# resend), is restarted after 1, 2, 4 ... up to 60 s: a crash loop shows in the log and spares the host.
STABLE_S, FIRST_BACKOFF_S, MAX_BACKOFF_S = 60.0, 1.0, 60.0
SHM_DIR = Path("/dev/shm")


def shm_prefix() -> str:
    """A python-backend shared-memory prefix unique to one server start."""
    return f"reward_server_{os.getpid()}_{secrets.token_hex(4)}_"


def remove_regions(prefix: str, folder: Path = SHM_DIR) -> tuple[int, int]:
    """Unlink the shared-memory regions named `prefix*`: (how many, bytes)."""
    count = size = 0
    for region in folder.glob(f"{prefix}*"):
        try:
            size += region.stat().st_size
            region.unlink()
            count += 1
        except FileNotFoundError:
            pass  # its server removed it meanwhile
    return count, size


def stubs(parent: int) -> dict[int, str]:
    """The live python-backend stubs `parent` started: PID -> the model it runs."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            arguments = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == parent and STUB in arguments[0] and fields[0] not in ("Z", "X"):
            found[int(stat.parent.name)] = Path(arguments[1].decode()).parent.parent.name  # <model>/<version>/model.py
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a dead stub stays a zombie until tritonserver reaps it


def answers(url: str) -> bool:
    return ready_state(url) is True


def ready_state(url: str) -> bool | None:
    """True on 200, False on another HTTP answer, None when nothing answered in time (a busy host)."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except urllib.error.HTTPError:
        return False
    except OSError:
        return None


def _log(line: str) -> None:
    print(line, flush=True)  # at once: stdout is often a file (a test or a container log reads it live)


async def supervise(command: list[str], env: dict[str, str], http: str, log: Callable[[str], None] = _log) -> int:
    """Run `command` until this process is asked to stop (SIGTERM/SIGINT, passed on); return its status.
    `http`: the server's plain HTTP endpoint (health checks)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    server: subprocess.Popen | None = None

    def stop(sig: int) -> None:
        stopping.set()
        if server is not None and server.poll() is None:
            server.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    restarts = quick_exits = 0
    while True:
        prefix = shm_prefix()
        server = subprocess.Popen([*command, f"--backend-config=python,shm-region-prefix-name={prefix}"], env=env)
        ready, expected, suspects, loaded = False, Counter(), set(), set()
        while server.poll() is None and not stopping.is_set():
            await asyncio.sleep(0.5)
            if not ready:
                loaded |= set(stubs(server.pid).values())
                if await loop.run_in_executor(None, answers, f"{http}/v2/health/ready"):
                    # A stub that died between its model's load and this poll is still expected.
                    ready, expected = True, Counter(stubs(server.pid).values()) | Counter(loaded)
                    ready_at = loop.time()
                    log(f"supervisor: tritonserver (pid {server.pid}) is ready")
                continue
            live = Counter(stubs(server.pid).values())
            short = {m for m in expected if live[m] < expected[m]}
            # Short of stubs and not known to be unready (no answer in time counts as ready: a loaded host).
            still_ready = {m for m in short if await loop.run_in_executor(None, ready_state, f"{http}/v2/models/{m}/ready") is not False}
            faults = sorted(still_ready & suspects)  # on two polls in a row
            suspects = still_ready
            if faults:
                log(f"supervisor: the python-backend stub of {', '.join(faults)} died; restarting tritonserver")
                await loop.run_in_executor(None, _stop, server)
            elif not suspects:
                expected = live  # models loaded, reloaded or unloaded meanwhile
        code = await loop.run_in_executor(None, server.wait)
        removed, size = remove_regions(prefix)
        if removed:
            log(f"supervisor: removed {removed} shared-memory region(s), {size >> 20} MiB, left by tritonserver")
        if stopping.is_set() or not ready:
            return code
        restarts += 1
        quick_exits = quick_exits + 1 if loop.time() - ready_at < STABLE_S else 1
        delay = restart_delay(quick_exits)
        log(
            f"supervisor: tritonserver exited with {code}; restart {restarts}"
            + (f" in {delay:g} s ({quick_exits} exits in a row within {STABLE_S:g} s of being ready)" if delay else "")
        )
        if delay:
            try:
                await asyncio.wait_for(stopping.wait(), delay)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11 (the NGC image's 3.10)
                pass
            if stopping.is_set():
                return code


def restart_delay(quick_exits: int) -> float:
    """Seconds to wait before restarting a server that has exited `quick_exits` times in a row, each within
    STABLE_S of becoming ready: none for the first, then FIRST_BACKOFF_S, doubling, at most MAX_BACKOFF_S."""
    return 0.0 if quick_exits <= 1 else min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (quick_exits - 2))


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
