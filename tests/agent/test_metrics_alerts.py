"""The documented alert rules (docs/memd-alerts.yml) and Grafana dashboard
(docs/grafana-memd.json) against Prometheus's own tools and memd's real metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
RULES = DOCS / "memd-alerts.yml"
DASHBOARD = DOCS / "grafana-memd.json"
PROMTOOL = shutil.which("promtool")

need_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (scripts/setup.sh --all)"
)

# promtool's rule unit tests: series in, alerts out (the real rule engine).
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'memd_tmem_cap_bytes{{instance="h:9643",job="memd",vm="full"}}'
        values: '1000x20'
      - series: 'memd_tmem_charged_bytes{{instance="h:9643",job="memd",vm="full"}}'
        values: '950x20'
      - series: 'memd_tmem_cap_bytes{{instance="h:9643",job="memd",vm="roomy"}}'
        values: '1000x20'
      - series: 'memd_tmem_charged_bytes{{instance="h:9643",job="memd",vm="roomy"}}'
        values: '500x20'
      - series: 'memd_sharing_potential_saved_frames{{instance="h:9643",job="memd",vm="a"}}'
        values: '60000x40'
      - series: 'memd_sharing_potential_saved_frames{{instance="h:9643",job="memd",vm="b"}}'
        values: '40000x40'
      - series: 'memd_sharing_realized_saved_frames{{instance="h:9643",job="memd",vm="a"}}'
        values: '6000x40'
      - series: 'memd_sharing_realized_saved_frames{{instance="h:9643",job="memd",vm="b"}}'
        values: '4000x40'
      - series: 'memd_sharing_potential_saved_frames{{instance="g:9643",job="memd",vm="c"}}'
        values: '100000x40'
      - series: 'memd_sharing_realized_saved_frames{{instance="g:9643",job="memd",vm="c"}}'
        values: '90000x40'
    alert_rule_test:
      - eval_time: 10m
        alertname: MemdGuestNearCap
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "h:9643", job: memd, vm: full}}
            exp_annotations:
              summary: "memd guest full is at 95% of its tmem cap"
              description: "Raise the cap, or expect NO_SPACE refusals (memd_tmem_no_space_total)."
      - eval_time: 20m
        alertname: MemdSharingFarBelowPotential
        exp_alerts: []
      - eval_time: 35m
        alertname: MemdSharingFarBelowPotential
        exp_alerts:
          - exp_labels: {{severity: info, instance: "h:9643", job: memd}}
            exp_annotations:
              summary: "KSM realizes less than half of the 100000 frames memd says could be saved"
              description: "{sharing_description}"
"""
SHARING_DESCRIPTION = (
    "Is KSM steering on (memd_ksm_steering_mode), are guests opted out, is ksmd stalled?"
)


@need_promtool
def test_alert_rules_are_valid() -> None:
    subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], check=True, capture_output=True, timeout=60
    )


@need_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tests = tmp_path / "tests.yml"
    tests.write_text(RULE_TESTS.format(rules=RULES, sharing_description=SHARING_DESCRIPTION))
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]


def documented_metrics() -> set[str]:
    """The metric table of docs/operators.md §8 (tests/agent/test_metrics.py checks that
    a real scrape exports nothing it leaves out)."""
    text = (DOCS / "operators.md").read_text()
    return set(re.findall(r"^\| `(memd_[a-z_]+)`", text, re.MULTILINE))


def _names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bmemd_[a-z_]+", expr)}


def test_dashboard_and_rules_name_only_documented_metrics() -> None:
    documented = documented_metrics()
    assert len(documented) >= 40
    queries = dashboard_queries()
    assert len(queries) >= 15
    rules = RULES.read_text()
    for expr in [*queries, rules]:
        assert _names(expr) <= documented, f"{_names(expr) - documented} in {expr!r}"
