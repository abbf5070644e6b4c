"""Tests of the kaapana-node Helm chart with the real Helm engine and the official schemas.

Run with the python of `kn_python_tools` (scripts/common.sh), which has helm-python-sdk
(Helm 4's engine through libhelm_c) and kubernetes-validate (the official JSON schemas):

    "$(bash -c '. scripts/common.sh && kn_python_tools')" charts/kaapana-node/tests/test_chart.py

For the default values and several non-default value sets, the chart is linted (strict, for
KUBE_VERSION) and rendered; every rendered object is validated strictly against the schemas
of KUBE_VERSION (the ServiceMonitor, a CRD the schemas do not know, is checked by shape here),
and the security-relevant properties are asserted. Bad values must fail with a message naming
the value. The init container's script is run against the real kaapana-node binary (KAAPANA_NODE_BIN,
or $CARGO_TARGET_DIR/debug or release; scripts/test passes the one it built): first start, restart, and
a key from a Secret, and the node must load the rendered configuration.
"""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import unittest

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
KUBE_VERSION = "1.32.0"
RELEASE = "kn"
NAMESPACE = "kaapana"

# The keys the node's config.rs (node/src/config.rs) accepts today, section by section; the
# chart may render only these, plus the [executor.kubernetes] table and kind = "kubernetes"
# of the Kubernetes executor being added.
CONFIG_KEYS = {
    "instance": {"name"},
    "network": {"listen", "advertise"},
    "api": {"listen"},
    "trust": {"federation_ca"},
    "executor": {"kind", "containerd_address", "pull_from", "insecure_registry"},
    "workflows": {"runner_lost_after_secs", "runner_give_up_after_secs"},
    "datasets": {"pacs_cache_bytes"},
}
# The keys of the Kubernetes executor's settings (KubernetesConfig in
# executor/src/kubernetes/objects.rs, being added).
KUBERNETES_EXECUTOR_KEYS = {
    "namespace", "image_repository", "volumes", "runtime_class", "node_selector",
    "image_pull_secrets", "default_limits", "gpu_resource", "run_as_non_root", "run_as_user",
    "run_as_group", "tmp_size_bytes",
}

# What the Kubernetes executor may do, exactly: (apiGroup, resource) -> verbs.
RBAC_RULES = {
    ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},
    ("networking.k8s.io", "networkpolicies"): {"create", "get", "list", "watch", "delete"},
}

# Non-default value sets.
EXISTING = {
    "persistence": {"existingClaim": "site-a-node-data"},
    "identity": {"existingSecret": "site-a-identity"},
    "service": {"type": "NodePort", "nodePorts": {"tcp": 30740, "udp": 30740}},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s"},
    "resources": {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    },
}
EXECUTOR = {
    "nodeName": "site-a",
    "namespaceOverride": "kaapana-node",
    "image": {
        "repository": "registry.site-a.org/kaapana/kaapana-node",
        "digest": "sha256:" + "ab" * 32,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "site-a-pull"}],
    "config": {
        "executor": {
            "kind": "kubernetes",
            "pullFrom": ["registry.site-a.org:5000/kaapana/jobs"],
            "insecureRegistry": True,
            "kubernetes": {
                "imageRepository": "registry.site-a.org:5000/kaapana/jobs",
                "imagePullSecrets": ["jobs-pull"],
                "runtimeClass": "gvisor",
                "nodeSelector": {"kubernetes.io/hostname": "gpu-1", "kaapana/jobs": "true"},
                "defaultLimits": {"cpuMillis": 2000, "memoryBytes": 4 << 30, "gpus": 0},
                "gpuResource": "amd.com/gpu",
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "tmpSizeBytes": 2 << 30,
            },
        },
        "workflows": {"runnerLostAfterSecs": 120, "runnerGiveUpAfterSecs": 7200},
        "datasets": {"pacsCacheBytes": 1 << 40},
        "trust": {"federationCaSecret": "consortium-ca"},
    },
    "persistence": {"size": "200Gi", "storageClass": "fast-ssd", "accessModes": ["ReadWriteMany"]},
    "networkPolicy": {
        "enabled": True,
        "apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "nodeSelector": {"kaapana/node": "true"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "kaapana", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
}
LOAD_BALANCER = {
    "nodeName": "site-b",
    "p2pPort": 4001,
    "advertise": ["/dns4/kaapana-b.example.org/tcp/4001", "/dns4/kaapana-b.example.org/udp/4001/quic-v1"],
    "service": {
        "type": "LoadBalancer",
        "loadBalancerSourceRanges": ["192.0.2.0/24", "2001:db8::/32"],
        "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
    },
}
# What Kaapana's Extensions tab passes (kube-helm: the platform release's `global.*` with
# `--set`, which makes numbers and booleans of some, and the dialog's parameters as
# `global.<name>`).
KAAPANA = {
    "global": {
        "registry_url": "registry.example.org/kaapana",
        "kaapana_build_version": "0.5.0",
        "pull_policy_images": "Always",
        "services_namespace": "services",
        "admin_namespace": "admin",
        "storage_class_fast": "kaapana-hostpath-fast-data-dir",
        "hostname": "kaapana.example.org",
        "dicom_port": 11112,
        "gpu_support": False,
        "internalCidrs": ["10.0.0.0/8"],
        "kaapana_node_name": "site-c",
        "kaapana_node_advertise": "/dns4/kaapana.example.org/tcp/30740,/dns4/kaapana.example.org/udp/30740/quic-v1",
        "kaapana_node_service_type": "NodePort",
    },
    "service": {"nodePorts": {"tcp": 30740, "udp": 30740}},
}
NO_EXECUTOR = {"config": {"executor": {"kind": "none"}}}

VALUE_SETS = {
    "default": {},
    "existing-claim-secret-nodeport-servicemonitor": EXISTING,
    "kubernetes-executor": EXECUTOR,
    "loadbalancer-advertised": LOAD_BALANCER,
    "kaapana-extensions-tab": KAAPANA,
    "no-executor": NO_EXECUTOR,
}

# Bad values and a part of the message each must fail with.
BAD_VALUES = {
    "empty persistence.size": ({"persistence": {"size": ""}}, "/persistence/size"),
    "invalid service.type": ({"service": {"type": "ExternalName"}}, "/service/type"),
    "invalid service type from the Extensions tab": (
        {"global": {"kaapana_node_service_type": "Headless"}},
        "global.kaapana_node_service_type",
    ),
    "advertised address that is no multiaddress": ({"advertise": ["kaapana.example.org:7400"]}, "/advertise/0"),
    "advertised address from the Extensions tab": (
        {"global": {"kaapana_node_advertise": "kaapana.example.org:7400"}},
        "global.kaapana_node_advertise",
    ),
    "containerd executor in a pod": ({"config": {"executor": {"kind": "containerd"}}}, "/config/executor/kind"),
    "image digest that is a tag": ({"image": {"digest": "latest"}}, "/image/digest"),
    "unknown key": ({"persistance": {"size": "1Gi"}}, "persistance"),
    "default limits without memory": (
        {"config": {"executor": {"kubernetes": {"defaultLimits": {"cpuMillis": 1000, "gpus": 0}}}}},
        "/config/executor/kubernetes/defaultLimits",
    ),
    "executor namespace other than the node's": (
        {"config": {"executor": {"kubernetes": {"namespace": "kaapana-jobs"}}}},
        "namespace",
    ),
    "two federation CAs": (
        {"config": {"trust": {"federationCaSecret": "ca", "federationCaFile": "federation-ca.crt"}}},
        "federationCaSecret or federationCaFile",
    ),
    "port out of range": ({"p2pPort": 70000}, "/p2pPort"),
}


def merged(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Rendered:
    """One rendering: the objects by kind and name, the notes and the node's config."""

    def __init__(self, chart: helm.Chart, values: dict):
        self.values = chart.merge_values(values)
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.notes = next(text for path, text in files.items() if path.endswith("NOTES.txt"))
        self.objects = []
        for path, text in files.items():
            if path.endswith(".yaml"):
                self.objects += [(path, o) for o in yaml.safe_load_all(text) if o]
        config_maps = self.all("ConfigMap")
        assert len(config_maps) == 1, config_maps
        self.config_text = config_maps[0]["data"]["config.toml"]
        self.config = tomllib.loads(self.config_text)

    def all(self, kind: str) -> list[dict]:
        return [o for _, o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [o for o in self.all(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def statefulset(self) -> dict:
        return self.one("StatefulSet")

    @property
    def pod(self) -> dict:
        return self.statefulset["spec"]["template"]["spec"]

    def container(self, name: str) -> dict:
        containers = self.pod["containers"] + self.pod.get("initContainers", [])
        return next(c for c in containers if c["name"] == name)


def check_service_monitor(test: unittest.TestCase, sm: dict, r: Rendered) -> None:
    """The ServiceMonitor's shape (monitoring.coreos.com/v1; no schema in kubernetes-validate)."""
    test.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
    test.assertEqual(set(sm), {"apiVersion", "kind", "metadata", "spec"})
    test.assertRegex(sm["metadata"]["name"], r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    spec = sm["spec"]
    test.assertEqual(set(spec), {"namespaceSelector", "selector", "endpoints"})
    headless = r.one("Service", "-headless")
    test.assertEqual(spec["namespaceSelector"], {"matchNames": [headless["metadata"]["namespace"]]})
    labels = spec["selector"]["matchLabels"]
    test.assertTrue(labels.items() <= headless["metadata"]["labels"].items(), "selects the headless Service")
    for svc in r.all("Service"):
        if svc is not headless:
            test.assertFalse(labels.items() <= svc["metadata"]["labels"].items(), "selects only the headless Service")
    (endpoint,) = spec["endpoints"]
    api_ports = [p["name"] for p in headless["spec"]["ports"] if p["port"] == r.values["apiPort"]]
    test.assertEqual(endpoint["port"], "api")
    test.assertEqual(api_ports, ["api"])
    test.assertEqual(endpoint["path"], "/metrics")
    test.assertEqual(endpoint["scheme"], "http")
    for key in ("interval", "scrapeTimeout"):
        test.assertRegex(endpoint[key], r"^([0-9]+(ms|s|m|h))+$")
    test.assertEqual(set(endpoint), {"port", "path", "scheme", "interval", "scrapeTimeout"})


class ChartTest(unittest.TestCase):
    chart: helm.Chart
    renders: dict[str, Rendered]

    @classmethod
    def setUpClass(cls) -> None:
        cls.chart = helm.Chart.load(CHART)
        cls.renders = {name: Rendered(cls.chart, values) for name, values in VALUE_SETS.items()}

    @classmethod
    def tearDownClass(cls) -> None:
        cls.chart.close()

    def test_metadata_follows_kaapana_extensions(self) -> None:
        meta = self.chart.metadata
        self.assertEqual(meta["apiVersion"], "v2")
        self.assertEqual(meta["type"], "application")
        workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
        self.assertEqual(meta["appVersion"], workspace)
        self.assertIn("kaapanaapplication", meta["keywords"])
        self.assertNotIn("kaapanamultiinstallable", meta["keywords"], "one node per instance")
        self.assertTrue(meta["annotations"]["ui-visible-name"])
        values = self.chart.values
        # kube-helm re-sets a chart's non-empty `global` values after the install dialog's.
        self.assertTrue(all(v == "" for v in values["global"].values()), values["global"])
        for name, param in values["extension_params"].items():
            if param["type"] != "doc":
                self.assertIn(name, values["global"], f"dialog parameter {name} is read from global")
                self.assertTrue(param["definition"])

    def test_lint_reports_no_warning_or_error(self) -> None:
        for name, values in VALUE_SETS.items():
            with self.subTest(values=name):
                report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
                self.assertEqual(report["errors"], [])
                problems = [m for m in report["messages"] if m["severity"] >= 2]
                self.assertEqual(problems, [])

    def test_every_object_validates_against_kubernetes(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                kinds = sorted(o["kind"] for _, o in r.objects)
                for path, obj in r.objects:
                    if obj["kind"] == "ServiceMonitor":
                        check_service_monitor(self, obj, r)
                        continue
                    try:
                        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        where = ".".join(str(p) for p in e.path)
                        self.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {where}: {e.message}")
                expected = {"ConfigMap", "Service", "ServiceAccount", "StatefulSet"}
                self.assertTrue(expected <= set(kinds), kinds)
                self.assertEqual(kinds.count("Service"), 2, "libp2p and headless")
                self.assertEqual(kinds.count("ServiceMonitor"), 1 if r.values["serviceMonitor"]["enabled"] else 0)
                self.assertEqual(kinds.count("NetworkPolicy"), 1 if r.values["networkPolicy"]["enabled"] else 0)

    def test_objects_are_namespaced_and_nothing_cluster_wide(self) -> None:
        expected = {"kaapana-extensions-tab": "services", "kubernetes-executor": "kaapana-node"}
        for name, r in self.renders.items():
            with self.subTest(values=name):
                ns = expected.get(name, NAMESPACE)
                for _, obj in r.objects:
                    self.assertNotIn(obj["kind"], {"ClusterRole", "ClusterRoleBinding", "Namespace", "Secret"})
                    self.assertEqual(obj["metadata"]["namespace"], ns, f"{obj['kind']}/{obj['metadata']['name']}")

    def test_rbac_is_exactly_what_the_executor_needs(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                if r.values["config"]["executor"]["kind"] != "kubernetes":
                    self.assertEqual(r.all("Role") + r.all("RoleBinding"), [])
                    self.assertIs(r.pod["automountServiceAccountToken"], False)
                    self.assertNotIn("kubernetes", r.config["executor"])
                    continue
                role, binding = r.one("Role"), r.one("RoleBinding")
                # The job pods run in the node's namespace: they mount its claim.
                node_ns = r.statefulset["metadata"]["namespace"]
                self.assertEqual(r.config["executor"]["kubernetes"]["namespace"], node_ns)
                self.assertEqual(role["metadata"]["namespace"], node_ns)
                self.assertEqual(binding["metadata"]["namespace"], node_ns)
                rules = {}
                for rule in role["rules"]:
                    self.assertEqual(set(rule), {"apiGroups", "resources", "verbs"}, "no resourceNames, no nonResourceURLs")
                    for group in rule["apiGroups"]:
                        for res in rule["resources"]:
                            self.assertNotIn((group, res), rules, "each resource once")
                            rules[(group, res)] = set(rule["verbs"])
                self.assertEqual(rules, RBAC_RULES)
                self.assertEqual(binding["roleRef"], {
                    "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]})
                sa = r.one("ServiceAccount")
                self.assertEqual(binding["subjects"], [{
                    "kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}])
                self.assertEqual(r.pod["serviceAccountName"], sa["metadata"]["name"])
                self.assertIs(sa["automountServiceAccountToken"], False)
                self.assertIs(r.pod["automountServiceAccountToken"], True, "only the executor needs the API")
        self.assertEqual(self.renders["kubernetes-executor"].one("Role")["metadata"]["namespace"], "kaapana-node")

    def test_identity_key_is_mounted_0400_copied_0600_never_in_a_configmap(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                self.assertNotIn("PRIVATE KEY", r.config_text)
                for _, obj in r.objects:
                    if obj["kind"] == "ConfigMap":
                        self.assertEqual(set(obj["data"]), {"config.toml"})
                setup, node = r.container("setup"), r.container("node")
                script = setup["command"][-1]
                self.assertIn('install_file /etc/kaapana-node/identity/identity.key "$dir/identity.key" 0600', script)
                self.assertIn("umask 077", script)
                for volume_mount in node["volumeMounts"]:
                    self.assertNotEqual(volume_mount["name"], "identity", "the daemon reads the 0600 copy only")
                secrets = [v for v in r.pod["volumes"] if "secret" in v and v["name"] == "identity"]
                if not r.values["identity"]["existingSecret"]:
                    self.assertEqual(secrets, [])
                    self.assertNotIn("identity", [m["name"] for m in setup["volumeMounts"]])
                    continue
                (volume,) = secrets
                secret = volume["secret"]
                self.assertEqual(secret["secretName"], r.values["identity"]["existingSecret"])
                self.assertIn(secret["defaultMode"], (0o400, 0o600))
                modes = {item["path"]: item["mode"] for item in secret["items"]}
                self.assertIn(modes["identity.key"], (0o400, 0o600))
                self.assertEqual({i["key"] for i in secret["items"]}, {"identity.key", "instance.crt"})
                (mount,) = [m for m in setup["volumeMounts"] if m["name"] == "identity"]
                self.assertEqual(mount["mountPath"], "/etc/kaapana-node/identity")
                self.assertIs(mount["readOnly"], True)

    def test_probes_on_healthz_at_the_api_port(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                node = r.container("node")
                ports = {p["name"]: p for p in node["ports"]}
                self.assertEqual(r.config["api"]["listen"], f"0.0.0.0:{ports['api']['containerPort']}")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    self.assertEqual(node[probe]["httpGet"], {"path": "/healthz", "port": "api"}, probe)

    def test_libp2p_on_tcp_and_udp_of_one_port(self) -> None:
        expected_type = {
            "existing-claim-secret-nodeport-servicemonitor": "NodePort",
            "loadbalancer-advertised": "LoadBalancer",
            "kaapana-extensions-tab": "NodePort",
        }
        for name, r in self.renders.items():
            with self.subTest(values=name):
                port = r.values["p2pPort"]
                self.assertEqual(r.config["network"]["listen"], [f"/ip4/0.0.0.0/tcp/{port}", f"/ip4/0.0.0.0/udp/{port}/quic-v1"])
                node_ports = {(p["protocol"], p["containerPort"]) for p in r.container("node")["ports"]}
                self.assertTrue({("TCP", port), ("UDP", port)} <= node_ports)
                svc = r.one("Service", "kaapana-node")
                self.assertEqual(svc["spec"]["type"], expected_type.get(name, "ClusterIP"))
                self.assertEqual(sorted((p["protocol"], p["port"]) for p in svc["spec"]["ports"]), [("TCP", port), ("UDP", port)],
                                 "the API is not on the libp2p Service")
                if svc["spec"]["type"] != "ClusterIP":
                    self.assertEqual(svc["spec"]["externalTrafficPolicy"], "Local")
                headless = r.one("Service", "-headless")
                self.assertEqual(headless["spec"]["clusterIP"], "None")
                self.assertEqual(r.statefulset["spec"]["serviceName"], headless["metadata"]["name"])
        nodeport = self.renders["existing-claim-secret-nodeport-servicemonitor"].one("Service", "kaapana-node")
        self.assertEqual({p["nodePort"] for p in nodeport["spec"]["ports"]}, {30740})
        lb = self.renders["loadbalancer-advertised"]
        self.assertEqual(lb.config["network"]["advertise"], LOAD_BALANCER["advertise"])
        self.assertEqual(lb.one("Service", "kaapana-node")["spec"]["loadBalancerSourceRanges"],
                         LOAD_BALANCER["service"]["loadBalancerSourceRanges"])
        self.assertNotIn("WARNING: no advertised addresses", lb.notes)
        self.assertIn("WARNING: no advertised addresses", self.renders["default"].notes)
        self.assertIn("imageRepository is empty", self.renders["default"].notes)
        self.assertNotIn("imageRepository is empty", self.renders["kubernetes-executor"].notes)

    def test_security_contexts(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                self.assertIs(r.pod["securityContext"]["runAsNonRoot"], True)
                self.assertGreater(r.pod["securityContext"]["runAsUser"], 0)
                for c in r.pod["containers"] + r.pod["initContainers"]:
                    sc = c["securityContext"]
                    self.assertIs(sc["runAsNonRoot"], True, c["name"])
                    self.assertIs(sc["readOnlyRootFilesystem"], True, c["name"])
                    self.assertIs(sc["allowPrivilegeEscalation"], False, c["name"])
                    self.assertEqual(sc["capabilities"], {"drop": ["ALL"]}, c["name"])
                    self.assertNotIn("privileged", sc)
                self.assertNotIn("hostNetwork", r.pod)
                self.assertFalse(any("hostPath" in v for v in r.pod["volumes"]))

    def test_config_toml_parses_with_only_known_keys(self) -> None:
        for name, r in self.renders.items():
            with self.subTest(values=name):
                c = r.config
                self.assertEqual(set(c), set(CONFIG_KEYS))
                for section, keys in CONFIG_KEYS.items():
                    extra = set(c[section]) - keys
                    if section == "executor":
                        extra.discard("kubernetes")
                    self.assertEqual(extra, set(), f"[{section}]")
                self.assertIn(c["executor"]["kind"], {"kubernetes", "none"})
                self.assertNotIn("containerd_address", c["executor"])
                if c["executor"]["kind"] == "kubernetes":
                    k = c["executor"]["kubernetes"]
                    self.assertTrue(set(k) <= KUBERNETES_EXECUTOR_KEYS, set(k))
                    # The job pods mount the node's own data volume: the data directory, which
                    # the node sees at local_path, is sub_path of the claim.
                    claim = r.values["persistence"]["existingClaim"] or f"data-{r.statefulset['metadata']['name']}-0"
                    data_dir = next(e["value"] for e in r.container("node")["env"] if e["name"] == "KAAPANA_NODE_DATA_DIR")
                    (mount,) = [m for m in r.container("node")["volumeMounts"] if m["name"] == "data"]
                    (volume,) = k["volumes"]
                    self.assertEqual(volume, {"local_path": data_dir, "type": "persistent_volume_claim",
                                              "claim_name": claim, "sub_path": volume["sub_path"]})
                    self.assertEqual(data_dir, f"{mount['mountPath']}/{volume['sub_path']}")
                    if r.values["persistence"]["existingClaim"]:
                        (data,) = [v for v in r.pod["volumes"] if v["name"] == "data"]
                        self.assertEqual(data["persistentVolumeClaim"]["claimName"], claim)
                    else:
                        (template,) = r.statefulset["spec"]["volumeClaimTemplates"]
                        self.assertEqual(f"{template['metadata']['name']}-{r.statefulset['metadata']['name']}-0", claim)
                self.assertIsInstance(c["datasets"]["pacs_cache_bytes"], int)
        ex = self.renders["kubernetes-executor"].config
        self.assertEqual(ex["instance"]["name"], "site-a")
        self.assertEqual(ex["executor"]["pull_from"], ["registry.site-a.org:5000/kaapana/jobs"])
        self.assertIs(ex["executor"]["insecure_registry"], True)
        self.assertEqual(ex["executor"]["kubernetes"], {
            "namespace": "kaapana-node",
            "image_repository": "registry.site-a.org:5000/kaapana/jobs",
            "image_pull_secrets": ["jobs-pull"],
            "volumes": [{"local_path": "/var/lib/kaapana-node/data", "type": "persistent_volume_claim",
                         "claim_name": "data-kn-kaapana-node-0", "sub_path": "data"}],
            "runtime_class": "gvisor",
            "node_selector": {"kubernetes.io/hostname": "gpu-1", "kaapana/jobs": "true"},
            "default_limits": {"cpu_millis": 2000, "memory_bytes": 4 << 30, "gpus": 0},
            "gpu_resource": "amd.com/gpu",
            "run_as_non_root": True,
            "run_as_user": 10001,
            "run_as_group": 10001,
            "tmp_size_bytes": 2 << 30,
        })
        self.assertEqual(self.renders["default"].config["executor"]["kubernetes"], {
            "namespace": NAMESPACE,
            "image_pull_secrets": [],
            "volumes": [{"local_path": "/var/lib/kaapana-node/data", "type": "persistent_volume_claim",
                         "claim_name": "data-kn-kaapana-node-0", "sub_path": "data"}],
            "run_as_non_root": False,
        })
        self.assertEqual(ex["workflows"], {"runner_lost_after_secs": 120, "runner_give_up_after_secs": 7200})
        self.assertEqual(ex["datasets"]["pacs_cache_bytes"], 1 << 40)
        self.assertEqual(ex["trust"]["federation_ca"], "/etc/kaapana-node/federation-ca/ca.crt")
        self.assertEqual(self.renders["default"].config["instance"]["name"], RELEASE)
        self.assertEqual(self.renders["existing-claim-secret-nodeport-servicemonitor"]
                         .config["executor"]["kubernetes"]["volumes"][0]["claim_name"], "site-a-node-data")

    def test_persistence(self) -> None:
        r = self.renders["default"]
        (template,) = r.statefulset["spec"]["volumeClaimTemplates"]
        self.assertEqual(template["metadata"]["name"], "data")
        self.assertEqual(template["spec"]["resources"]["requests"]["storage"], "20Gi")
        self.assertNotIn("storageClassName", template["spec"])
        self.assertEqual(r.statefulset["spec"]["replicas"], 1)
        self.assertEqual(r.statefulset["spec"]["persistentVolumeClaimRetentionPolicy"],
                         {"whenDeleted": "Retain", "whenScaled": "Retain"})
        ex = self.renders["existing-claim-secret-nodeport-servicemonitor"]
        self.assertNotIn("volumeClaimTemplates", ex.statefulset["spec"])
        (data,) = [v for v in ex.pod["volumes"] if v["name"] == "data"]
        self.assertEqual(data["persistentVolumeClaim"], {"claimName": "site-a-node-data"})
        (template,) = self.renders["kubernetes-executor"].statefulset["spec"]["volumeClaimTemplates"]
        self.assertEqual(template["spec"]["storageClassName"], "fast-ssd")
        self.assertEqual(template["spec"]["accessModes"], ["ReadWriteMany"])
        self.assertEqual(ex.container("node")["resources"], EXISTING["resources"])

    def test_kaapana_globals(self) -> None:
        r = self.renders["kaapana-extensions-tab"]
        node = r.container("node")
        self.assertEqual(node["image"], "registry.example.org/kaapana/kaapana-node:0.1.0")
        self.assertEqual(node["imagePullPolicy"], "Always")
        self.assertEqual(r.pod["imagePullSecrets"], [{"name": "registry-secret"}])
        self.assertEqual(r.config["instance"]["name"], "site-c")
        self.assertEqual(r.config["network"]["advertise"], KAAPANA["global"]["kaapana_node_advertise"].split(","))
        (template,) = r.statefulset["spec"]["volumeClaimTemplates"]
        self.assertEqual(template["spec"]["storageClassName"], "kaapana-hostpath-fast-data-dir")
        d = self.renders["default"].container("node")
        self.assertEqual((d["image"], d["imagePullPolicy"]), ("kaapana-node:0.1.0", "IfNotPresent"))
        self.assertNotIn("imagePullSecrets", self.renders["default"].pod)
        e = self.renders["kubernetes-executor"].container("node")
        self.assertEqual(e["image"], "registry.site-a.org/kaapana/kaapana-node@sha256:" + "ab" * 32)

    def test_bad_values_fail_with_a_clear_message(self) -> None:
        for name, (values, message) in BAD_VALUES.items():
            with self.subTest(name):
                with self.assertRaises((helm.HelmValuesError, helm.HelmRenderError)) as caught:
                    self.chart.render(values, name=RELEASE, namespace=NAMESPACE)
                self.assertIn(message, str(caught.exception))


def node_binary() -> pathlib.Path | None:
    candidates = [os.environ.get("KAAPANA_NODE_BIN", "")]
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    candidates += [str(target / "debug" / "kaapana-node"), str(target / "release" / "kaapana-node")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return pathlib.Path(c)
    return None


class InitContainerTest(unittest.TestCase):
    """The init container's script, run with /bin/sh and the real kaapana-node, with the pod's
    paths moved into a temporary directory."""

    def setUp(self) -> None:
        self.assertIsNotNone(
            node_binary(),
            "no kaapana-node binary: build it (cargo build -p kaapana-node) or set KAAPANA_NODE_BIN",
        )
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="kn-chart-"))
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        (self.bin / "kaapana-node").symlink_to(node_binary())

    def tearDown(self) -> None:
        shutil.rmtree(self.tmp)

    def prepare(self, values: dict) -> tuple[str, dict, pathlib.Path]:
        """The script and environment of the setup container, with the ConfigMap (and
        Secret) written where the pod would mount them."""
        with helm.Chart.load(CHART) as chart:
            r = Rendered(chart, values)
        setup = r.container("setup")
        etc = self.tmp / "etc"
        script = setup["command"][-1].replace("/etc/kaapana-node", str(etc))
        (etc / "config").mkdir(parents=True)
        (etc / "config" / "config.toml").write_text(r.config_text)
        env = {e["name"]: e["value"] for e in setup["env"]}
        data_dir = self.tmp / env["KAAPANA_NODE_DATA_DIR"].lstrip("/")
        data_dir.parent.mkdir(parents=True)
        env["KAAPANA_NODE_DATA_DIR"] = str(data_dir)
        env["PATH"] = f"{self.bin}:/usr/bin:/bin"
        return script, env, data_dir

    def sh(self, script: str, env: dict) -> str:
        done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        return done.stdout

    def node(self, env: dict, *args: str) -> str:
        done = subprocess.run(["kaapana-node", *args], env=env, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        return done.stdout

    def test_first_start_inits_and_a_restart_keeps_the_identity(self) -> None:
        script, env, data_dir = self.prepare(merged(NO_EXECUTOR, {"nodeName": "site-x"}))
        out = self.sh(script, env)
        self.assertIn("kaapana-node init", out)
        self.assertEqual(stat.S_IMODE((data_dir / "identity.key").stat().st_mode), 0o600)
        info = self.node(env, "info")  # loads the rendered config.toml with the node's parser
        self.assertIn("BEGIN CERTIFICATE", self.node(env, "instance", "export"))  # and the key
        self.assertIn("site-x", info)
        self.assertEqual((data_dir / "config.toml").read_text(), (self.tmp / "etc/config/config.toml").read_text())
        out = self.sh(script, env)
        self.assertNotIn("kaapana-node init", out)
        self.assertEqual(self.node(env, "info"), info, "same identity after a restart")

    def test_the_default_kubernetes_executor_config_loads_in_the_node(self) -> None:
        # The defaults configure the Kubernetes executor: the node's own parser must take the
        # rendered [executor] section with its [executor.kubernetes] table.
        script, env, data_dir = self.prepare({"nodeName": "site-k"})
        self.sh(script, env)
        text = (data_dir / "config.toml").read_text()
        self.assertIn('kind = "kubernetes"', text)
        self.assertIn("site-k", self.node(env, "info"))

    def test_key_from_a_secret_is_installed_0600(self) -> None:
        # The Secret's files, as a kubelet with fsGroup leaves them: group-readable.
        elsewhere = self.tmp / "elsewhere"
        made = subprocess.run(["kaapana-node", "init", "--name", "site-y", "--data-dir", str(elsewhere)],
                              env={"PATH": f"{self.bin}:/usr/bin:/bin"}, capture_output=True, text=True)
        self.assertEqual(made.returncode, 0, made.stderr)
        values = merged(NO_EXECUTOR, {"nodeName": "site-y", "identity": {"existingSecret": "site-y-identity"}})
        script, env, data_dir = self.prepare(values)
        secret = self.tmp / "etc" / "identity"
        secret.mkdir()
        for f in ("identity.key", "instance.crt"):
            shutil.copy(elsewhere / f, secret / f)
            (secret / f).chmod(0o440)
        self.sh(script, env)
        self.assertEqual(stat.S_IMODE((data_dir / "identity.key").stat().st_mode), 0o600)
        self.assertEqual((data_dir / "identity.key").read_bytes(), (elsewhere / "identity.key").read_bytes())
        # Signing a bundle loads the key, which the node refuses unless only its owner can read it.
        self.assertIn("BEGIN CERTIFICATE", self.node(env, "instance", "export"))
        env_elsewhere = dict(env, KAAPANA_NODE_DATA_DIR=str(elsewhere))
        fingerprint = [l for l in self.node(env_elsewhere, "info").splitlines() if l.startswith("fingerprint")]
        self.assertEqual([l for l in self.node(env, "info").splitlines() if l.startswith("fingerprint")], fingerprint)


if __name__ == "__main__":
    print(f"helm engine {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}, libhelm_c "
          f"{helm.helm_c_version()}); kubernetes-validate {kubernetes_validate.__version__}, "
          f"schemas v{KUBE_VERSION} (strict); kaapana-node binary: {node_binary() or 'none'}")
    result = unittest.main(verbosity=2, exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)
