"""deploy/kubernetes/: every manifest is valid against the Kubernetes schemas (with and without its optional
``#+`` fields), and every pdserve container runs a real subcommand with settings its config accepts.

``kubernetes-validate`` bundles the schemas: no cluster and no network is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_cli import check_pdserve_command

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra) is "
                                          "not installed")

DEPLOY = Path(__file__).parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
POD_FIELDS = {"status.podIP": "10.1.2.3"}  # what the kubelet fills in, for the config check
KEYS_ROLE = {"gateway": "gateway", "prefill": "engine", "decode": "engine"}  # the keys directory each runs with
OPTIONAL = re.compile(r"^(\s*)#\+ ", re.M)


def documents(optional: bool) -> list[tuple[str, dict]]:
    """(file name, document) of every manifest; ``optional``: with the ``#+`` lines uncommented."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        found += [(path.name, doc) for doc in yaml.safe_load_all(OPTIONAL.sub(r"\1", text) if optional else text)]
    return found


def pdserve_containers() -> list[tuple[str, dict, dict]]:
    """(workload name, pod spec, container) of every container that runs pdserve."""
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"], c) for _, doc in documents(optional=True)
            if doc["kind"] == "Deployment" for c in doc["spec"]["template"]["spec"]["containers"]
            if c["command"][0] == "pdserve"]


def environment(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes sets it: ``$(VAR)`` expanded, pod fields by stand-ins, a
    Secret's value by a placeholder."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            env[var["name"]] = POD_FIELDS[field] if field else "from-a-secret"
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    return env


@pytest.mark.parametrize("optional", [False, True], ids=["plain", "with-optional-fields"])
def test_every_manifest_is_valid_kubernetes(optional):
    docs = documents(optional)
    assert {doc["kind"] for _, doc in docs} == {"Service", "StatefulSet", "Deployment"}
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message}") from None
    text = "\n".join(p.read_text() for p in DEPLOY.glob("*.yaml"))
    for field in ("nvidia.com/gpu", "IPC_LOCK"):  # GPU and RDMA requests are there, as optional fields
        assert re.search(rf"^\s*#\+ .*{re.escape(field)}", text, re.M), field


def test_every_container_runs_a_real_pdserve_command_with_valid_settings():
    containers = pdserve_containers()
    assert sorted(c["command"][1] for _, _, c in containers) == ["decode", "gateway", "prefill"]
    for workload, _, container in containers:
        check_pdserve_command(workload, container["command"], environment(container))


def test_keys_registry_and_probes_fit_the_settings():
    etcd = next(doc for _, doc in documents(False) if doc["kind"] == "StatefulSet")
    members = ",".join(f"{etcd['metadata']['name']}-{i}.{etcd['spec']['serviceName']}:2379"
                       for i in range(etcd["spec"]["replicas"]))
    for workload, pod, container in pdserve_containers():
        env, role = environment(container), KEYS_ROLE[container["command"][1]]
        assert env["PDSERVE_REGISTRY"] == f"etcd://{members}", workload  # every etcd member, for failover
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["PDSERVE_KEYS_DIR"]]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"pdserve-keys-{role}", workload  # the keys of its role
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if role == "gateway":
            assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
            assert ports[container["readinessProbe"]["httpGet"]["port"]] == int(env["PDSERVE_PORT"])
        else:  # the engine's request socket, where it binds: open (TCP), and answering (GetStats, its own key)
            for probe in ("startupProbe", "livenessProbe"):
                port = ports[container[probe]["tcpSocket"]["port"]]
                assert env["PDSERVE_BIND"] == f"tcp://{POD_FIELDS['status.podIP']}:{port}", (workload, probe)
            shell, flag, check = container["readinessProbe"]["exec"]["command"]  # the shell expands $VAR
            expanded = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], check)
            assert (shell, flag, expanded) == ("sh", "-c", f"python -m common.healthcheck engine {env['PDSERVE_BIND']}")
