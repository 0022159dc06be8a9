"""scripts/soak in a short run: it completes, reports every figure, and attributes failures.

This does not require the targets to be met: the soak is a measuring instrument, and
whether mplb passes is what it reports, not what this test checks.  It checks that the
run ends with a verdict (exit 0 or 1, not a crash of the soak itself), that the JSON
has every field, and that the incidents happened and were attributed.
"""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.timeout(180)

SOAK = os.path.join(ROOT, "scripts", "soak")
ARGS = ["--duration", "20", "--tunnels", "50", "--http-rate", "20", "--reload-every", "3",
        "--kill-every", "8", "--restart-every", "10"]
CAUSES = {"killed_worker", "restarted_backend", "other"}


def run_soak(json_path, timeout=120):
    """Run the soak; on overrun, TERM it (it stops what it started) before killing it."""
    proc = subprocess.Popen([sys.executable, SOAK, *ARGS, "--json", str(json_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"soak overran {timeout} s:\n{output}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("soak") / "soak.json"
    code, output = run_soak(json_path)
    assert code in (0, 1), f"soak crashed (exit {code}):\n{output}"
    with open(json_path) as handle:
        return json.load(handle), output


def test_reports_every_figure(soak):
    result, output = soak
    for key in ("requests", "failed_requests", "tunnels_lost_other_than_killed_or_restarted",
                "messages_lost", "messages_duplicated", "reloads_ok", "reloads_failed",
                "processes", "shared_memory", "flatness", "targets"):
        assert key in result, f"{key} missing:\n{output}"
    assert set(result["failed_requests"]["by_cause"]) == CAUSES, output
    for label in ("start", "end"):
        sample = result["processes"][label]
        assert sample["master"]["rss"] > 0 and sample["master"]["fds"] > 0, output
        assert sample["workers"], output
        for figures in sample["workers"].values():
            assert {"rss_sum", "rss_avg", "fds_sum", "fds_avg"} <= set(figures), output
        assert result["shared_memory"][label]["use"] is not None, output
    assert result["flatness"]["baseline"] == "start", output      # a run under 60 s
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert result["mplb_nofile_limit"] == hard, output            # raised, and inherited
    assert "ALL TARGETS MET" in output or "TARGETS MISSED" in output, output


def test_incidents_happen_and_are_attributed(soak):
    result, output = soak
    assert result["requests"] >= 300, output
    assert result["reloads_ok"] >= 3, output
    # The killer picks workers that hold connections; one may still hand its last over
    # to a new generation between the pick and the kill, so not every kill need have any.
    assert len(result["kills"]) >= 2 and any(k["ports"] > 0 for k in result["kills"]), output
    assert result["restarts"] and result["restarts"][0]["kind"] == "ws", output
    lost = result["tunnels_lost"]["by_cause"]
    assert lost["killed_worker"] >= 1, output
    assert lost["restarted_backend"] >= 1, output
    assert result["messages_sent"] > 0 and result["tunnels_survived"] > 0, output
