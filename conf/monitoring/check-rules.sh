#!/bin/sh
# Check the alert rules with Prometheus' own tool: the PrometheusRule's spec
# is a rules file; promtool checks its syntax and runs the unit tests in
# rules-test.yaml (series in, alerts out).  Needs promtool (Debian:
# apt-get install prometheus) and PyYAML.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"))' \
  "$here/prometheusrule.yaml" "$work/rules.yaml"
cp "$here/rules-test.yaml" "$work/"
promtool check rules "$work/rules.yaml"
cd "$work" && promtool test rules rules-test.yaml
