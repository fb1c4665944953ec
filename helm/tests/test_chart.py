"""The Helm chart, checked by real tools: Helm's own engine renders it for several value sets
(and lints it strictly), kubernetes-validate --strict checks every object, checkov finds no
failed check, network-config-analyzer proves the NetworkPolicies allow exactly the expected
connectivity (and never the advisor to the signer), and values.schema.json refuses bad values.

Run with the Kubernetes tools' virtualenv (make test-chart does):
    .venv-k8s/bin/python -m unittest discover -s helm/tests -v
"""

import copy
import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "engram"
TESTS = ROOT / "helm" / "tests"
BIN = pathlib.Path(sys.executable).parent
SERVICES = ["telegram-gateway", "exchange-signer", "llm-advisor", "audit-sink"]
KUBE_VERSION = "1.31.0"

def deep_merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# Value sets the chart must render cleanly for. Each is merged over values.yaml.
OTEL = {"otel": {"endpoint": "http://otel-collector.observability.svc:4317"}}
OUTSIDE = {
    "signer": {"exchange": {"egress": {"cidrs": ["203.0.113.0/24"], "ports": [443]}}},
    "advisor": {"llm": {"egress": {"cidrs": ["198.51.100.0/24"], "ports": [1234]}}},
}
VALUE_SETS = {
    "default": {},
    # The README's minimal values file, as an operator would pass it with -f.
    "readme-minimal": yaml.safe_load((ROOT / "helm" / "minimal-values.yaml").read_text()),
    "monitoring-on": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
            "prometheusRule": {"enabled": True},
            "dashboards": {"enabled": True, "namespace": "monitoring"},
        },
        **OTEL,
    },
    "approle": {
        "vault": {
            "auth": {
                "kind": "approle",
                "mount": "approle",
                "approle": {
                    "roleIds": {s: f"role-id-of-{s}" for s in SERVICES},
                    "secretIdSecrets": {s: f"{s}-secret-id" for s in SERVICES},
                },
            },
            "network": {"cidrs": ["10.20.0.10/32"], "port": 8200},
            "ca": {"configMap": "vault-ca"},
        }
    },
    "cert-manager": {"tls": {"mode": "cert-manager"}},
    "tls-secrets": {"tls": {"mode": "secret", "secrets": {s: f"{s}-mtls" for s in SERVICES}}},
    "webhook": {
        "gateway": {
            "telegram": {
                "mode": "webhook",
                "webhook": {
                    "publicUrl": "https://bot.example.org/telegram",
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                            }
                        }
                    ],
                },
            }
        }
    },
    "digests": deep_merge(
        OUTSIDE,
        {
            "image": {"digests": {s: "sha256:" + f"{i}" * 64 for i, s in enumerate(SERVICES)}},
            "advisor": {"replicas": 3},
        },
    ),
}


def render(values):
    """Rendered manifests as one YAML stream, plus NOTES.txt."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values=values, name="engram", namespace="trading", is_install=True)
    docs = [text for name, text in sorted(files.items()) if name.endswith(".yaml") and text.strip()]
    notes = next((text for name, text in files.items() if name.endswith("NOTES.txt")), "")
    return "\n---\n".join(docs), notes


def objects(stream):
    return [doc for doc in yaml.safe_load_all(stream) if doc]


def run(*args, cwd=None):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False)


def workload_images(objs):
    """The image of every container of the rendered Deployments and StatefulSets."""
    return [
        c["image"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
        for c in o["spec"]["template"]["spec"]["containers"]
    ]


def workloads(folder):
    """(namespace, name, pod labels) of every Deployment and StatefulSet under `folder`."""
    found = []
    for path in sorted(pathlib.Path(folder).glob("*.yaml")):
        for o in objects(path.read_text()):
            if o.get("kind") in ("Deployment", "StatefulSet"):
                meta = o["metadata"]
                found.append((meta["namespace"], meta["name"], o["spec"]["template"]["metadata"]["labels"]))
    return found


def matches(expression, labels):
    """Whether pod `labels` satisfy one of nca's label expressions (terms joined by "and")."""
    for term in expression.split(" and "):
        term = term.strip()
        if " not in (" in term:
            key, values = term.split(" not in (")
            ok = labels.get(key.strip()) not in values.rstrip(")").split(",")
        elif " in (" in term:
            key, values = term.split(" in (")
            ok = labels.get(key.strip()) in values.rstrip(")").split(",")
        elif "!=" in term:
            key, value = term.split("!=")
            ok = labels.get(key.strip()) != value.strip()
        elif "=" in term:
            key, value = term.split("=")
            ok = labels.get(key.strip()) == value.strip()
        elif term.startswith("has(") and term.endswith(")"):
            ok = term[4:-1] in labels
        elif term.startswith("!has(") and term.endswith(")"):
            ok = term[5:-1] not in labels
        else:
            raise ValueError(f"nca label expression not understood: {term!r}")
        if not ok:
            return False
    return True


def endpoints(namespaces, pods, known):
    """The workload names (or the IP block) one side of an nca row stands for."""
    if not namespaces:
        return [pods]  # an IP block
    spaces = namespaces.strip("[]").split(",")
    inner = pods.strip("[]")
    chosen = []
    for namespace, name, labels in known:
        if namespace not in spaces:
            continue
        if inner == "*" or name in inner.split(",") or ("=" in inner or " in (" in inner) and matches(inner, labels):
            chosen.append(f"{namespace}/{name}")
    return chosen


def arrows(csv_text, known):
    """nca's grouped connectivity expanded to sorted "src -> dst : connection" lines, kept when
    either side is one of the release's workloads (the rest of the stub cluster is not ours)."""
    ours = {f"{ns}/{name}" for ns, name, labels in known if labels.get("app.kubernetes.io/part-of") == "engram"}
    lines = set()
    for row in csv.reader(io.StringIO(csv_text)):
        if len(row) < 6 or row[0] != "":
            continue
        _, src_ns, src_pods, dst_ns, dst_pods, connection = row[:6]
        for src in endpoints(src_ns, src_pods, known):
            for dst in endpoints(dst_ns, dst_pods, known):
                if src != dst and (src in ours or dst in ours):
                    lines.add(f"{src} -> {dst} : {connection}")
    return sorted(lines)


class Rendering(unittest.TestCase):
    """Every value set renders, lints, validates and passes checkov."""

    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory(prefix="chart-")
        cls.rendered = {}
        for name, values in VALUE_SETS.items():
            stream, notes = render(values)
            folder = pathlib.Path(cls.scratch.name) / name
            folder.mkdir()
            (folder / "manifest.yaml").write_text(stream)
            cls.rendered[name] = (folder, objects(stream), notes)

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def test_strict_lint(self):
        report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE_VERSION}")
        self.assertEqual(report["errors"], [], report)
        # Only informational messages (severity 1, e.g. "icon is recommended") may remain.
        self.assertEqual([m for m in report["messages"] if m["severity"] > 1], [], report)

    def test_kubernetes_validate_strict(self):
        for name, (folder, _, _) in self.rendered.items():
            with self.subTest(values=name):
                result = run(
                    str(BIN / "kubernetes-validate"),
                    "--strict",
                    "--kubernetes-version",
                    KUBE_VERSION,
                    str(folder / "manifest.yaml"),
                )
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                self.assertNotIn("ERROR", result.stdout + result.stderr)

    def test_checkov_has_no_failed_check(self):
        for name, (folder, _, _) in self.rendered.items():
            with self.subTest(values=name):
                result = run(
                    str(BIN / "checkov"),
                    "-d",
                    str(folder),
                    "--framework",
                    "kubernetes",
                    "--skip-download",
                    "-o",
                    "json",
                )
                report = json.loads(result.stdout)
                summary = report["summary"]
                failed = [c["check_id"] + " " + c["resource"] for c in report["results"]["failed_checks"]]
                self.assertEqual(summary["failed"], 0, failed)
                self.assertGreater(summary["passed"], 100, summary)
                # Every skip is one of the two documented in templates/_helpers.tpl.
                skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
                self.assertLessEqual(skipped, {"CKV_K8S_43", "CKV_K8S_15"}, skipped)
                self.assertIn("CKV_K8S_15", skipped)

    def test_digests_pin_images_and_lift_the_digest_skip(self):
        images = workload_images(self.rendered["digests"][1])
        self.assertEqual(len(images), 4)
        self.assertTrue(all("@sha256:" in image for image in images), images)
        tags = workload_images(self.rendered["default"][1])
        self.assertTrue(all(image.endswith(":0.1.0") for image in tags), tags)

    def test_pods_are_restricted(self):
        for name, (_, objs, _) in self.rendered.items():
            for o in objs:
                if o["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                with self.subTest(values=name, workload=o["metadata"]["name"]):
                    pod = o["spec"]["template"]["spec"]
                    self.assertIs(pod["automountServiceAccountToken"], False)
                    self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
                    for c in pod["containers"]:
                        sc = c["securityContext"]
                        self.assertTrue(sc["runAsNonRoot"])
                        self.assertEqual(sc["runAsUser"], 65532)
                        self.assertFalse(sc["allowPrivilegeEscalation"])
                        self.assertTrue(sc["readOnlyRootFilesystem"])
                        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                        self.assertIn("limits", c["resources"])
                        self.assertIn("requests", c["resources"])
                        self.assertEqual(c["livenessProbe"]["httpGet"]["port"], "admin")
                        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/readyz")
                        env = {e["name"]: e.get("value") for e in c["env"]}
                        # No secret reaches a pod through its environment.
                        self.assertFalse([e for e in c["env"] if "valueFrom" in e])
                        self.assertIn(env["ENGRAM_TLS_MODE"], ("vault", "file"))

    def test_singletons_and_their_strategies(self):
        _, objs, _ = self.rendered["digests"]
        by_name = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
        self.assertEqual(by_name["engram-exchange-signer"]["spec"]["replicas"], 1)
        self.assertEqual(by_name["engram-exchange-signer"]["spec"]["strategy"]["type"], "Recreate")
        self.assertEqual(by_name["engram-telegram-gateway"]["spec"]["strategy"]["type"], "Recreate")
        self.assertEqual(by_name["engram-audit-sink"]["kind"], "StatefulSet")
        self.assertEqual(by_name["engram-audit-sink"]["spec"]["replicas"], 1)
        # Three advisors share the 30 requests a minute: 10 each.
        advisor = by_name["engram-llm-advisor"]
        self.assertEqual(advisor["spec"]["replicas"], 3)
        env = {e["name"]: e["value"] for e in advisor["spec"]["template"]["spec"]["containers"][0]["env"]}
        self.assertEqual(env["ENGRAM_LLM_REQUESTS_PER_MINUTE"], "10")

    def test_vault_auth_kinds(self):
        _, k8s, _ = self.rendered["default"]
        _, approle, _ = self.rendered["approle"]
        for objs, expected, mount in ((k8s, "kubernetes", "vault-token"), (approle, "approle", "vault-approle")):
            for o in objs:
                if o["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                pod = o["spec"]["template"]["spec"]
                env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
                self.assertEqual(env["ENGRAM_VAULT_AUTH"], expected)
                self.assertIn(mount, [v["name"] for v in pod["volumes"]])
        token = next(
            v for o in k8s if o["kind"] == "Deployment"
            for v in o["spec"]["template"]["spec"]["volumes"] if v["name"] == "vault-token"
        )
        source = token["projected"]["sources"][0]["serviceAccountToken"]
        self.assertEqual(source["audience"], "vault")
        self.assertLessEqual(source["expirationSeconds"], 3600)

    def test_a_private_vault_ca_is_mounted_for_engram_vault_ca_file(self):
        _, with_ca, _ = self.rendered["approle"]
        _, without, _ = self.rendered["default"]
        for objs, expected in ((with_ca, True), (without, False)):
            for o in objs:
                if o["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                pod = o["spec"]["template"]["spec"]
                env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
                self.assertEqual("ENGRAM_VAULT_CA_FILE" in env, expected)
                if expected:
                    self.assertEqual(env["ENGRAM_VAULT_CA_FILE"], "/var/run/engram/vault-ca/ca.crt")
                    volume = next(v for v in pod["volumes"] if v["name"] == "vault-ca")
                    self.assertEqual(volume["configMap"]["name"], "vault-ca")

    def test_cert_manager_certificates_carry_spiffe_identities(self):
        _, objs, _ = self.rendered["cert-manager"]
        certs = [o for o in objs if o["kind"] == "Certificate"]
        self.assertEqual(sorted(c["spec"]["uris"][0] for c in certs), sorted(f"spiffe://engram/{s}" for s in SERVICES))
        for cert in certs:
            self.assertEqual(cert["spec"]["duration"], "24h")
        _, default, _ = self.rendered["default"]
        self.assertFalse([o for o in default if o["kind"] == "Certificate"])

    def test_monitoring_objects_only_when_asked(self):
        _, on, _ = self.rendered["monitoring-on"]
        kinds = [o["kind"] for o in on]
        self.assertIn("ServiceMonitor", kinds)
        self.assertIn("PrometheusRule", kinds)
        dashboards = [o for o in on if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
        self.assertEqual(len(dashboards), len(list((ROOT / "deploy" / "grafana").glob("*.json"))))
        for dashboard in dashboards:
            self.assertEqual(dashboard["metadata"]["namespace"], "monitoring")
            for text in dashboard["data"].values():
                self.assertIn("panels", json.loads(text))
        rule = next(o for o in on if o["kind"] == "PrometheusRule")
        shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "engram-rules.yaml").read_text())
        self.assertEqual(rule["spec"]["groups"], shipped["groups"])
        _, off, _ = self.rendered["default"]
        self.assertFalse({"ServiceMonitor", "PrometheusRule"} & {o["kind"] for o in off})

    def test_notes_tell_what_to_do_next(self):
        _, _, notes = self.rendered["default"]
        self.assertIn("deploy/vault/README.md", notes)
        self.assertIn("signer.exchange.egress.cidrs is empty", notes)
        _, _, configured = self.rendered["digests"]
        self.assertNotIn("egress.cidrs is empty", configured)


class ChartCopies(unittest.TestCase):
    """The chart packages deploy/'s rules and dashboards; its copies must not drift."""

    def test_rules_and_dashboards_are_the_shipped_ones(self):
        self.assertEqual(
            (CHART / "files" / "engram-rules.yaml").read_bytes(),
            (ROOT / "deploy" / "prometheus" / "engram-rules.yaml").read_bytes(),
            "copy deploy/prometheus/engram-rules.yaml to helm/engram/files/",
        )
        shipped = sorted(p.name for p in (ROOT / "deploy" / "grafana").glob("*.json"))
        packaged = sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json"))
        self.assertEqual(shipped, packaged)
        for name in shipped:
            self.assertEqual(
                (CHART / "files" / "dashboards" / name).read_bytes(),
                (ROOT / "deploy" / "grafana" / name).read_bytes(),
                f"copy deploy/grafana/{name} to helm/engram/files/dashboards/",
            )


class Connectivity(unittest.TestCase):
    """network-config-analyzer over the rendered chart and a stub cluster (fixtures/)."""

    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory(prefix="nca-")
        cls.dir = pathlib.Path(cls.scratch.name)
        stream, _ = render(deep_merge(OTEL, OUTSIDE))
        (cls.dir / "engram.yaml").write_text(stream)
        (cls.dir / "cluster.yaml").write_text((TESTS / "fixtures" / "cluster.yaml").read_text())

    @classmethod
    def tearDownClass(cls):
        cls.scratch.cleanup()

    def nca(self, *args):
        # Relative paths: nca prints them in its output, which is compared with a committed file.
        return run(str(BIN / "nca"), *args, "-r", ".", cwd=str(self.dir))

    def test_connectivity_equals_the_committed_table(self):
        expected_file = TESTS / "expected-connectivity.txt"
        result = self.nca("--connectivity", ".", "-o", "csv")
        self.assertEqual(result.returncode, 0, result.stderr)
        actual = arrows(result.stdout, workloads(self.dir))
        expected = [
            line.strip()
            for line in expected_file.read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        self.assertEqual(
            actual,
            expected,
            f"connectivity changed; if intended, update {expected_file} to:\n" + "\n".join(actual),
        )

    def test_the_advisor_never_reaches_the_signer(self):
        result = self.nca("--forbids", str(TESTS / "fixtures" / "forbidden.yaml"), "--base_np_list", ".")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("forbids connections specified in", result.stdout)

    def test_the_forbids_check_can_fail(self):
        # The gateway does reach the signer: forbidding it must be reported as violated.
        forbidden = self.dir / "gateway-to-signer.yaml"
        forbidden.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "gateway-to-signer", "namespace": "trading"},
                    "spec": {
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "exchange-signer"}},
                        "policyTypes": ["Ingress"],
                        "ingress": [
                            {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "telegram-gateway"}}}]}
                        ],
                    },
                }
            )
        )
        result = self.nca("--forbids", str(forbidden), "--base_np_list", ".")
        self.assertNotEqual(result.returncode, 0, result.stdout)

    def test_label_expressions_are_understood(self):
        labels = {"app.kubernetes.io/name": "llm-advisor", "app.kubernetes.io/instance": "engram"}
        self.assertTrue(matches("app.kubernetes.io/instance=engram and app.kubernetes.io/name in (llm-advisor,x)", labels))
        self.assertFalse(matches("app.kubernetes.io/name in (audit-sink,exchange-signer)", labels))
        self.assertFalse(matches("app.kubernetes.io/name!=llm-advisor", labels))
        with self.assertRaises(ValueError):
            matches("app.kubernetes.io/name ~ llm", labels)


class Schema(unittest.TestCase):
    """values.schema.json refuses bad values at install, naming the field."""

    BAD = [
        ({"gateway": {"replicas": 2}}, "/gateway/replicas"),
        (
            {"gateway": {"replicas": 2, "telegram": {"mode": "webhook", "webhook": {"publicUrl": "https://b.example.org/t", "from": [{}]}}}},
            "/gateway/replicas",
        ),
        ({"gateway": {"telegram": {"mode": "webhook"}}}, "/gateway/telegram"),
        ({"gateway": {"telegram": {"mode": "webhook", "webhook": {"publicUrl": "http://b.example.org/t", "from": [{}]}}}}, "publicUrl"),
        ({"gateway": {"telegram": {"mode": "push"}}}, "/gateway/telegram/mode"),
        ({"signer": {"replicas": 2}}, "/signer/replicas"),
        ({"audit": {"replicas": 3}}, "/audit/replicas"),
        ({"advisor": {"replicas": 0}}, "/advisor/replicas"),
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"digests": {"exchange-signer": "sha256:abc"}}}, "/image/digests"),
        ({"image": {"digests": {"trader-bot": "sha256:" + "a" * 64}}}, "trader-bot"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"vault": {"address": "vault:8200"}}, "/vault/address"),
        ({"vault": {"auth": {"kind": "ldap"}}}, "/vault/auth/kind"),
        ({"vault": {"auth": {"kind": "approle", "mount": "approle", "approle": {"roleIds": {}}}}}, "/vault/auth"),
        ({"vault": {"paths": {"audit-sink": "../etc"}}}, "/vault/paths"),
        ({"vault": {"ca": {"configMap": "a", "secret": "b"}}}, "/vault/ca"),
        ({"tls": {"mode": "none"}}, "/tls/mode"),
        ({"tls": {"vault": {"ttlSeconds": 604800}}}, "/tls/vault/ttlSeconds"),
        ({"tls": {"certManager": {"duration": "720h"}}}, "/tls/certManager/duration"),
        ({"tls": {"mode": "secret"}}, "/tls"),
        ({"signer": {"exchange": {"egress": {"cidrs": ["0.0.0.0/33"], "ports": [443]}}}}, "/signer/exchange/egress/cidrs/0"),
        ({"signer": {"exchange": {"egress": {"cidrs": [], "ports": [70000]}}}}, "/signer/exchange/egress/ports/0"),
        ({"signer": {"policy": {"symbols": "btc-usdt"}}}, "/signer/policy/symbols"),
        ({"signer": {"policy": {"maxDailyNotional": "-5"}}}, "/signer/policy/maxDailyNotional"),
        ({"signer": {"persistence": {"size": "lots"}}}, "/signer/persistence/size"),
        ({"signer": {"extraEnv": {"BINANCE_API_SECRET": "x"}}}, "BINANCE_API_SECRET"),
        ({"gateway": {"extraEnv": {"ENGRAM_VAULT_TOKEN": "x"}}}, "ENGRAM_VAULT_TOKEN"),
        # Mutual TLS cannot be switched off, nor a peer redirected, through extraEnv.
        ({"audit": {"extraEnv": {"ENGRAM_TLS_MODE": "off"}}}, "ENGRAM_TLS_MODE"),
        ({"advisor": {"extraEnv": {"ENGRAM_AUDIT_ADDR": "http://evil:50051"}}}, "ENGRAM_AUDIT_ADDR"),
        ({"resources": {"limits": {"memory": "a lot"}}}, "/resources/limits/memory"),
        ({"monitoring": {"serviceMonitor": {"enabled": "yes"}}}, "/monitoring/serviceMonitor/enabled"),
        ({"otel": {"endpoint": "collector:4317"}}, "/otel/endpoint"),
        ({"gatway": {"replicas": 1}}, "gatway"),
    ]

    def test_bad_values_fail_with_the_field_named(self):
        for values, where in self.BAD:
            with self.subTest(values=values):
                with self.assertRaises(Exception) as caught:
                    render(values)
                message = str(caught.exception)
                self.assertIn("schema", message)
                self.assertIn(where, message)

    def test_good_values_pass(self):
        for name, values in VALUE_SETS.items():
            with self.subTest(values=name):
                render(values)


if __name__ == "__main__":
    unittest.main()
