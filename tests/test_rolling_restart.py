"""A rolling restart under load (benchmarks/rolling_restart.py): two real ganet-serve replicas behind Debian's
HAProxy, health-checked on /v2/health/ready, each stopped with SIGTERM and started again in turn while 4 closed-loop
clients POST a photograph through the load balancer. Targets: no failed request, p99 during the restarts <= 3x p99
before them.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from test_serve import export_dir  # noqa: F401  (the session's one real export)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_rolling_restart_loses_nothing(export_dir):  # noqa: F811
    if shutil.which("haproxy") is None and not os.path.exists("/usr/sbin/haproxy"):
        if os.environ.get("CI"):
            pytest.fail("haproxy is missing: .ci/run installs it with apt")
        pytest.skip("needs Debian's haproxy (apt-get install haproxy)")
    import rolling_restart

    result = rolling_restart.run(export_dir, clients=4, baseline_s=3.0, settle_s=1.0, drain_delay_s=1.0)
    before, during = result["before"], result["during_restart"]
    print({k: result[k] for k in ("failed_requests", "requests", "p99_during_over_before", "restart_s",
                                  "replica_under_load")}, before["latency_ms"], during["latency_ms"])
    assert result["failed_requests"] == 0, (before["failed"], during["failed"])
    assert before["requests"] > 20 and during["requests"] > 20  # the load really ran through both phases
    assert all(len(s) == 1 for s in result["restart_s"].values())  # each replica restarted once, and came back UP
    assert all(s < 0.9 for s in result["lb_down_after_sigterm_s"].values())  # readiness 503 took it out first
    assert result["p99_during_over_before"] <= 3.0
