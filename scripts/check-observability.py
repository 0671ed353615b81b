#!/usr/bin/env python3
"""Evaluate the dashboard's panel queries and the alert rules against a live
Prometheus that scrapes a running Holdfast fleet (scripts/verify-observability.sh
sets that up). Standard library only.

Checks, each printed as a table; any failure makes the exit code 1:
  1. the dashboard file: valid JSON, every panel on the provisioned datasource,
     every panel (rows aside) with at least one query, no unknown variables;
  2. every dashboard query: parses, and returns at least one series with a
     number (not NaN) in it;
  3. every alert rule, as Prometheus loaded it (GET /api/v1/rules): healthy
     (evaluated without error), its whole expression parses, its signal
     returns series, and every metric it names exists;
  4. expectations about the scenario: PromQL expressions and the value each
     must have, and alerts that must or must not be firing now.

Alert expressions follow the convention stated in alerts.yml:
  <signal> <comparison> <threshold>   or   absent(<signal> == 1)
The comparison legitimately returns nothing on a healthy system, so the
signal is what must return series.
"""

import argparse
import json
import math
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

COMPARISON = re.compile(r"^(?P<signal>.*\S)\s*(?:>=|<=|==|!=|>|<)\s*(?:bool\s+)?[-+]?[0-9.]+(?:e[-+]?[0-9]+)?\s*$", re.S)
ABSENT = re.compile(r"^absent\((?P<inner>.*)\)$", re.S)
# Metric names: identifiers outside quotes that are not functions, keywords,
# label names (inside braces or by/without lists) or durations.
KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
    "quantile", "count_values", "group", "by", "without", "on", "ignoring",
    "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def get(self, path, **params):
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=20) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": f"HTTP {e.code}: {body[:200]}"}

    def query(self, expr):
        """(ok, error, series) for an instant query."""
        r = self.get("/api/v1/query", query=expr)
        if r.get("status") != "success":
            return False, r.get("error", "query failed"), []
        data = r["data"]
        if data["resultType"] in ("scalar", "string"):
            return True, "", [{"metric": {}, "value": data["result"]}]
        return True, "", data["result"]


def number(series):
    try:
        return float(series["value"][1])
    except (KeyError, IndexError, ValueError):
        return math.nan


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr):
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, subqueries
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if rest.startswith("("):  # a function or aggregation
            continue
        if word.lower() in KEYWORDS:
            continue
        names.add(word)
    return sorted(names)


def signal_of(expr):
    expr = expr.strip()
    m = ABSENT.match(expr)
    if m:
        expr = m.group("inner").strip()
    m = COMPARISON.match(expr)
    if not m:
        return None
    return m.group("signal").strip()


def substitute(expr, variables):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(name)
        return variables[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    widths[0] = min(widths[0], 110)
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) if isinstance(c, int) else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--datasources", required=True, help="Grafana datasource provisioning file")
    ap.add_argument("--alerts", required=True, help="the alert rules file Prometheus loaded")
    ap.add_argument("--var", action="append", default=[], help="NAME=VALUE dashboard variable")
    ap.add_argument("--expect", action="append", default=[], help="PROMQL=VALUE that must hold")
    ap.add_argument("--firing", action="append", default=[], help="alert that must fire now")
    ap.add_argument("--quiet", action="append", default=[], help="alert that must not fire now")
    ap.add_argument("--summary", help="write '<checks passed> <checks failed>' to this file")
    args = ap.parse_args()

    prom = Prometheus(args.prometheus)
    failures = []
    variables = dict(v.split("=", 1) for v in args.var)

    # 1. The dashboard file.
    with open(args.dashboard) as f:
        dash = json.load(f)
    with open(args.datasources) as f:
        uids = re.findall(r"^\s*uid:\s*['\"]?([\w-]+)", f.read(), re.M)
    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))
    targets = []
    for p in panels:
        if p.get("type") == "row":
            continue
        ds = (p.get("datasource") or {}).get("uid")
        if ds not in uids:
            failures.append(f"panel '{p.get('title')}': datasource uid {ds!r} is not provisioned ({uids})")
        if not p.get("targets"):
            failures.append(f"panel '{p.get('title')}' has no query")
        for t in p.get("targets", []):
            tds = (t.get("datasource") or {}).get("uid", ds)
            if tds not in uids:
                failures.append(f"panel '{p.get('title')}' query {t.get('refId')}: datasource uid {tds!r} is not provisioned")
            targets.append((p.get("title"), t.get("refId"), t.get("expr", "")))
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)):
        failures.append("panel ids are not unique")
    print(f"dashboard '{dash.get('title')}' (uid {dash.get('uid')}): "
          f"{sum(1 for p in panels if p.get('type') != 'row')} panels, {len(targets)} queries")

    # 2. Every panel query.
    rows = []
    for title, ref, expr in targets:
        try:
            query = substitute(expr, variables)
        except KeyError as e:
            failures.append(f"panel '{title}' {ref}: unknown variable ${e.args[0]}")
            rows.append((expr, "-", "-", "UNKNOWN VARIABLE"))
            continue
        ok, err, series = prom.query(query)
        values = [number(s) for s in series]
        finite = [v for v in values if not math.isnan(v)]
        if not ok:
            verdict = f"PARSE/QUERY ERROR: {err}"
            failures.append(f"panel '{title}' {ref}: {err}: {query}")
        elif not series:
            verdict = "NO SERIES"
            failures.append(f"panel '{title}' {ref}: no series: {query}")
        elif not finite:
            verdict = "ONLY NaN"
            failures.append(f"panel '{title}' {ref}: only NaN values: {query}")
        else:
            verdict = "ok"
        sample = f"{finite[0]:.6g}" if finite else "-"
        rows.append((expr, len(series), sample, verdict))
    table("Dashboard panel queries (evaluated with " + ", ".join(f"${k}={v}" for k, v in variables.items()) + ")",
          ("expr", "series", "value", "result"), rows)

    # 3. Every alert rule, as loaded.
    with open(args.alerts) as f:
        in_file = len(re.findall(r"^\s*-\s*alert:", f.read(), re.M))
    r = prom.get("/api/v1/rules", type="alert")
    rules = [rule for g in r["data"]["groups"] for rule in g["rules"] if rule.get("type") == "alerting"]
    if len(rules) != in_file or not rules:
        failures.append(f"Prometheus loaded {len(rules)} alert rules, {args.alerts} has {in_file}")
    rows = []
    names_seen = {}
    firing_now = {}
    for rule in rules:
        name, expr = rule["name"], rule["query"]
        problems = []
        if rule.get("health") != "ok":
            problems.append(f"health {rule.get('health')}: {rule.get('lastError')}")
        ok, err, full = prom.query(expr)
        if not ok:
            problems.append(f"does not parse: {err}")
        firing_now[name] = firing_now.get(name, 0) + len(full)
        signal = signal_of(expr)
        n_signal = "-"
        if signal is None:
            problems.append("not of the form '<signal> <cmp> <number>' or 'absent(<signal> == 1)'")
        else:
            ok, err, series = prom.query(signal)
            n_signal = len(series)
            if not ok:
                problems.append(f"signal does not parse: {err}")
            elif not series:
                problems.append("signal returns no series")
        missing = []
        for metric in metric_names(expr):
            if metric not in names_seen:
                ok, _, series = prom.query(f"count({{__name__={json.dumps(metric)}}})")
                names_seen[metric] = bool(ok and series)
            if not names_seen[metric]:
                missing.append(metric)
        if missing:
            problems.append("metrics that do not exist: " + ", ".join(missing))
        for p in problems:
            failures.append(f"alert {name} ({expr}): {p}")
        rows.append((f"{name}: {expr}", n_signal, len(full), "ok" if not problems else "; ".join(problems)))
    table("Alert rules (signal = the expression without its comparison; firing = the whole expression now)",
          ("alert: expr", "signal series", "firing", "result"), rows)

    # 4. Scenario expectations.
    rows = []
    for item in args.expect:
        expr, want = item.rsplit("=", 1)
        ok, err, series = prom.query(expr)
        got = number(series[0]) if ok and len(series) == 1 else math.nan
        good = not math.isnan(got) and abs(got - float(want)) < 1e-9
        if not good:
            failures.append(f"expected {expr} = {want}, got {got if ok else err} ({len(series)} series)")
        rows.append((expr, want, f"{got:.6g}", "ok" if good else "FAIL"))
    for name in args.firing:
        good = firing_now.get(name, 0) > 0
        if not good:
            failures.append(f"alert {name} should fire after the scenario but does not")
        rows.append((f"alert {name}", "firing", firing_now.get(name, 0), "ok" if good else "FAIL"))
    for name in args.quiet:
        good = name in firing_now and firing_now[name] == 0
        if not good:
            failures.append(f"alert {name} should be quiet (and loaded) but fires {firing_now.get(name)}")
        rows.append((f"alert {name}", "quiet", firing_now.get(name, "not loaded"), "ok" if good else "FAIL"))
    if rows:
        table("Scenario expectations", ("query", "expected", "got", "result"), rows)

    checks = 1 + len(targets) + len(rules) + len(args.expect) + len(args.firing) + len(args.quiet)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(f"{max(0, checks - len(failures))} {len(failures)}\n")
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(f"\nOK: {len(targets)} panel queries and {len(rules)} alert rules evaluated against live data.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
