"""
Tests for the Grafana dashboard and the Prometheus alert rules in
C{conf/monitoring}: every metric they name is one sentry_tx exports, and
every alert has a runbook section.
"""

import json
import os
import re

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sentry_tx.metrics import SentryMetrics, metrics_root
from sentry_tx.testing.certificates import make_bundle
from sentry_tx.testing.rendering import render
from sentry_tx.testing.source_tree import PROJECT_ROOT

MONITORING = os.path.join(PROJECT_ROOT, "conf", "monitoring")
RUNBOOK = os.path.join(PROJECT_ROOT, "docs", "runbook.md")

# PromQL words that are not metric names.
_PROMQL_WORDS = frozenset(
    "by without on ignoring group_left group_right bool and or unless offset"
    " sum min max avg count stddev stdvar topk bottomk quantile count_values".split()
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expression):
    """
    The metric names a PromQL expression selects: identifiers that are not
    functions, keywords, label names or text inside strings, braces or
    brackets.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name in _PROMQL_WORDS:
            continue
        if re.fullmatch(r"[0-9.e+-]+", name):
            continue
        names.add(name)
    return names


def exported_sample_names():
    """
    The sample names on sentry_tx's metrics port (C{_total}, C{_bucket} ...
    included), with a bundle in service.
    """
    metrics = SentryMetrics()
    metrics.record_bundle(make_bundle())
    _, body = render(metrics_root(metrics), b"/metrics")
    return {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def dashboard_expressions():
    with open(
        os.path.join(MONITORING, "grafana-dashboard.json"), encoding="utf-8"
    ) as f:
        dashboard = json.load(f)
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            expressions.append(match.group(1))
    return dashboard, expressions


def alert_rules():
    with open(os.path.join(MONITORING, "prometheusrule.yaml"), encoding="utf-8") as f:
        document = yaml.safe_load(f)
    return document, [
        rule for group in document["spec"]["groups"] for rule in group["rules"]
    ]


class PromQLNamesTests(SynchronousTestCase):
    """
    The helper that finds metric names in PromQL.
    """

    def test_names(self):
        """
        Functions, keywords, label names, label values and ranges are not
        metric names; selectors are.
        """
        self.assertEqual(
            metric_names(
                'histogram_quantile(0.99, sum by (le, outcome) '
                '(rate(a_bucket{job=~"x", outcome!="success"}[5m])))'
                " / on (job) group_left b_total - time() > 30 * 86400 and c"
            ),
            {"a_bucket", "b_total", "c"},
        )


class DashboardTests(SynchronousTestCase):
    """
    C{conf/monitoring/grafana-dashboard.json}.
    """

    def test_every_metric_exported(self):
        """
        Every metric the dashboard queries is one sentry_tx exports.
        """
        _, expressions = dashboard_expressions()
        exported = exported_sample_names()
        named = set().union(*(metric_names(e) for e in expressions))
        self.assertTrue(named)
        self.assertEqual(named - exported, set())

    def test_shows_the_new_metrics(self):
        """
        The dashboard shows the signing latency histogram and the process
        metrics.
        """
        _, expressions = dashboard_expressions()
        text = " ".join(expressions)
        self.assertIn("dapr_sentry_cert_sign_duration_seconds_bucket", text)
        self.assertIn("process_resident_memory_bytes", text)

    def test_panels_unique_and_described(self):
        """
        Panel ids are unique and each panel says what it shows.
        """
        dashboard, _ = dashboard_expressions()
        ids = [panel["id"] for panel in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in dashboard["panels"]:
            self.assertTrue(panel["description"], panel["title"])


class AlertRulesTests(SynchronousTestCase):
    """
    C{conf/monitoring/prometheusrule.yaml}.
    """

    def test_every_metric_exported(self):
        """
        Every metric an alert's expression names is one sentry_tx exports.
        """
        _, rules = alert_rules()
        exported = exported_sample_names()
        for rule in rules:
            names = metric_names(rule["expr"])
            self.assertTrue(names, rule["alert"])
            self.assertEqual(names - exported, set(), rule["alert"])

    def test_required_alerts(self):
        """
        The alerts the runbook promises exist: issuer and root within 30 and
        7 days, the failure ratio, no signature while requests arrive, and a
        refused reload.
        """
        document, rules = alert_rules()
        self.assertEqual(document["kind"], "PrometheusRule")
        by_name = {rule["alert"]: rule for rule in rules}
        for name, seconds in (
            ("DaprSentryIssuerExpiresIn30Days", "30 * 86400"),
            ("DaprSentryIssuerExpiresIn7Days", "7 * 86400"),
            ("DaprSentryRootExpiresIn30Days", "30 * 86400"),
            ("DaprSentryRootExpiresIn7Days", "7 * 86400"),
        ):
            self.assertIn(seconds, by_name[name]["expr"])
        self.assertIn(
            "dapr_sentry_cert_sign_failure_total",
            by_name["DaprSentrySignFailureRatioHigh"]["expr"],
        )
        no_signature = by_name["DaprSentryNoSuccessfulSignature"]["expr"]
        self.assertIn(
            "increase(dapr_sentry_cert_sign_success_total[10m])) == 0", no_signature
        )
        self.assertIn(
            "dapr_sentry_cert_sign_request_received_total[10m])) > 0", no_signature
        )
        self.assertIn(
            "dapr_sentry_issuercert_reload_failed_total",
            by_name["DaprSentryReloadFailed"]["expr"],
        )
        switchover = by_name["DaprSentryCASwitchoverWithin7Days"]["expr"]
        self.assertIn("dapr_sentry_ca_switchover_timestamp > 0", switchover)
        self.assertIn("7 * 86400", switchover)

    def test_runbook_sections(self):
        """
        Every alert links to a section of docs/runbook.md that exists.
        """
        with open(RUNBOOK, encoding="utf-8") as f:
            headings = {
                re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(
                    " ", "-"
                )
                for line in f
                if line.startswith("#")
            }
        _, rules = alert_rules()
        for rule in rules:
            path, _, anchor = rule["annotations"]["runbook"].partition("#")
            self.assertEqual(path, "docs/runbook.md")
            self.assertIn(anchor, headings, rule["alert"])


class PromtoolTests(SynchronousTestCase):
    """
    Prometheus' own checker on the rules, where Debian's prometheus package
    (promtool) is installed.
    """

    def test_check_and_unit_tests(self):
        """
        C{conf/monitoring/check-rules.sh}: C{promtool check rules} accepts
        the rules and promtool's unit tests of every alert pass (each alert
        fires on the series that should fire it, and not on the others).
        """
        import shutil
        import subprocess

        from twisted.trial.unittest import SkipTest

        if shutil.which("promtool") is None:
            raise SkipTest("promtool is not installed (apt-get install prometheus)")
        result = subprocess.run(
            [os.path.join(MONITORING, "check-rules.sh")],
            capture_output=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 0, output)
        self.assertIn(f"SUCCESS: {len(alert_rules()[1])} rules found", output)
        self.assertIn("Unit Testing:  rules-test.yaml\n  SUCCESS", output)
