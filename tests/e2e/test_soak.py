"""A short run of bench/soak.py in `make test`: load with settings churn, dropped SMTP
connections, policy refusals, slow final replies and a relay without AUTH through a real
2-worker gunicorn; nothing lost, nothing duplicated, nobody suppressed."""

from __future__ import annotations

import importlib.util
import sys

from tests.e2e.conftest import REPO_ROOT


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", REPO_ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_load_with_faults_loses_and_duplicates_nothing(tmp_path):
    report = _soak_module().run(
        seconds=20, accounts=3, clients=3, drop_every=40, log=lambda _text: None
    )
    assert report["violations"] == [], report
    # The run really exercised what it claims to: traffic, churn and faults.
    assert report["sent_200"] > 200, report
    assert report["settings_changes"] >= 20, report
    assert sum(sum(d.values()) for d in report["connections_dropped"].values()) >= 5, report
    assert sum(report["policy_refusals"].values()) >= 5, report  # issue #10's faults too
    assert sum(report["slow_final_replies"].values()) >= 3, report
    assert report["delivered_without_auth"] > 0, report
    assert report["failed_by_category"].get("policy", 0) > 0, report
    assert report["duplicates"] == 0 and report["lost"] == 0 and report["wrong_server"] == 0
    assert report["wrongly_suppressed"] == 0
    # Bounded per worker: descriptors grow by at most the pools' size (3 servers x 3 accounts
    # x 3 connections) plus a margin, memory by less than 64 MiB.
    for rss_growth, fd_growth in report["worker_growth_rss_kib_and_fds"].values():
        assert fd_growth <= 27 + 20, report
        assert rss_growth < 64 * 1024, report
