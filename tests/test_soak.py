"""A short soak (`bench/soak.py`): two client processes against two real replicas sharing a real Redis, through
loopback fault proxies, while Redis is restarted twice, one replica is killed and restarted, the wire is delayed and
streaming connections are cut. Every answer must equal diffusers' own embeddings, every call must end in success or
a clear status, each fault must be logged once, and the servers' open files must not grow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 2  # client processes


@pytest.mark.slow
def test_short_soak_loses_nothing(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    out = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench/soak.py"), "--clients", str(CLIENTS), "--duration",
                             "12", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    totals = report["totals"]
    assert totals["wrong"] == 0 and totals["unexpected"] == 0, report["failures_kept"]
    assert totals["failed_with_status_outside_deadline_and_cancel"] == 0, report["failures_kept"]
    for op in ("hit", "miss", "duplicate", "multi", "large", "cancel", "deadline"):
        assert sum(totals["by_op"].get(op, {}).values()) > 0, (op, totals)
    assert totals["by_op"]["cancel"].get("cancelled", 0) > 0
    kinds = [f["fault"] for f in report["faults"]]
    assert kinds.count("redis_killed") == kinds.count("redis_restarted") == 2, kinds
    assert kinds.count("replica_killed") == kinds.count("replica_restarted") == 1, kinds
    assert kinds.count("connections_cut") == 3 and sum(map(sum, (f["streams"] for f in report["faults"]
                                                                 if f["fault"] == "connections_cut"))) > 0, kinds
    lives = report["replicas"]
    assert [(life["replica"], life["life"]) for life in lives] == [("a", 0), ("b", 0), ("b", 1)]
    for life in lives:
        assert life["tracebacks"] == 0 and life["execute_batch_errors"] == 0, life
        assert life["redis_unreachable"] <= life["redis_outages_lived_through"], life
        assert life["killed"] or life["redis_back"] == life["redis_unreachable"], life
        fds = life["resources"].get("fds")
        if fds:  # a life long enough to sample: open files stay within a few of where warm-up left them
            assert fds["max"] <= fds["first"] + 8, life
            # the server's mapping cache at most, and those it has just let go of while their calls still run: per
            # client its call, and a call it cancelled that the server is still unwinding
            assert life["resources"]["arena_fds"]["max"] <= 64 + 2 * CLIENTS, life
    assert lives[2]["encode_lines"] > 0  # the restarted replica took traffic again
    assert report["exit_codes_on_sigterm"] == {"a": 0, "b": 0}
    assert report["verdict"]["passed"], report["verdict"]
    assert result.returncode == 0, result.stdout[-3000:]
