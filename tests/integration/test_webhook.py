"""The admission webhook over real HTTPS on loopback, with curl as the API server's stand-in."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.config import HostPort
from sidecar.inject import InjectSettings, patch_for
from sidecar.webhook import WebhookServer

SVC = "spiffe-sidecar.spiffe-system.svc"
SETTINGS = InjectSettings(image="spiffe-sidecar:0.1.0")
POLICY = "allow GET /api/stock/* from spiffe://example.org/ns/shop/sa/checkout\ndeny * /admin/** from *\n"


@dataclass
class Pki:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def make_pki(dns: str) -> Pki:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"webhook test CA {uuid.uuid4().hex[:8]}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Pki(
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def write_secret(directory: Path, pki: Pki, generation: int) -> None:
    """Emulate the kubelet's AtomicWriter for a Secret volume: a timestamped dir, `..data` swapped by rename."""
    ts = directory / f"..gen_{generation}"
    ts.mkdir()
    (ts / "tls.crt").write_bytes(pki.cert_pem)
    (ts / "tls.key").write_bytes(pki.key_pem)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.rename(tmp, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


@pytest.fixture
def secret_dir(tmp_path: Path) -> tuple[Path, Pki]:
    pki = make_pki(SVC)
    d = tmp_path / "tls"
    d.mkdir()
    write_secret(d, pki, 1)
    return d, pki


@pytest.fixture
async def server(secret_dir: tuple[Path, Pki]) -> AsyncIterator[WebhookServer]:
    d, _ = secret_dir
    srv = WebhookServer(
        HostPort("127.0.0.1", 0),
        cert=d / "tls.crt",
        key=d / "tls.key",
        settings=SETTINGS,
        request_timeout=5,
        reload_interval=0.1,
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def curl(
    port: int, ca: bytes, tmp: Path, body: bytes | None, *, host: str = SVC, path: str = "/mutate"
) -> tuple[int, int, str]:
    """(curl exit code, HTTP status, body): curl --resolve pins the name to loopback like a Service IP."""
    ca_file = tmp / f"ca-{uuid.uuid4().hex}.crt"
    ca_file.write_bytes(ca)
    args = ["curl", "-sS", "--max-time", "20", "--cacert", str(ca_file), "--resolve", f"{host}:{port}:127.0.0.1"]
    args += ["-o", "-", "-w", "\n%{http_code}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    args.append(f"https://{host}:{port}{path}")
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(body)
    if proc.returncode:
        print("curl:", err.decode())
    text, _, status = out.decode().rpartition("\n")
    assert proc.returncode is not None
    return proc.returncode, int(status or 0), text


def deployment_pod(**annotations: str) -> dict[str, Any]:
    """A Pod as a ReplicaSet creates it: empty name, generateName, no namespace in the object."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "inventory-5d8c7b9f4-",
            "labels": {"app": "inventory", "pod-template-hash": "5d8c7b9f4", "spiffe-sidecar.io/inject": "true"},
            "annotations": {f"spiffe-sidecar.io/{k.replace('_', '-')}": v for k, v in annotations.items()},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "inventory-5d8c7b9f4",
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "serviceAccountName": "inventory",
            "containers": [
                {
                    "name": "app",
                    "image": "python:3.11-slim",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"}},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                }
            ],
        },
    }


def review(
    obj: dict[str, Any], *, kind: str = "Pod", resource: str = "pods", operation: str = "CREATE"
) -> dict[str, Any]:
    gvk = {"group": "", "version": "v1", "kind": kind}
    gvr = {"group": "", "version": "v1", "resource": resource}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": "",
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def admit(server: WebhookServer, pki: Pki, tmp: Path, rev: dict[str, Any]) -> dict[str, Any]:
    assert server.port is not None
    rc, status, text = await curl(server.port, pki.ca_pem, tmp, json.dumps(rev).encode())
    assert (rc, status) == (0, 200), text
    out = json.loads(text)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == rev["request"]["uid"]
    resp: dict[str, Any] = out["response"]
    return resp


async def test_injects_valid_pod_and_second_pass_is_noop(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    _, pki = secret_dir
    pod = deployment_pod(app_port="8080", inbound_policy=POLICY)
    resp = await admit(server, pki, tmp_path, review(pod))
    assert resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(resp["patch"]))
    assert any(op["path"] == "/metadata/annotations/spiffe-sidecar.io~1status" for op in ops)
    patched = jsonpatch.apply_patch(copy.deepcopy(pod), ops)
    for version in ("1.29.0", "1.33.0", "1.37.0"):
        kubernetes_validate.validate(patched, version, strict=True)
    sidecar = patched["spec"]["initContainers"][0]
    assert sidecar["name"] == "spiffe-sidecar" and sidecar["restartPolicy"] == "Always"
    # Probes rewritten to the sidecar's plain probe port, paths kept.
    app = patched["spec"]["containers"][0]
    assert app["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021, "scheme": "HTTP"}
    assert app["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 15021, "scheme": "HTTP"}
    # The namespace came from the request, not the object (which has none).
    assert "namespace" not in patched["metadata"]
    # Reinvocation / a second admission of the injected pod changes nothing.
    again = await admit(server, pki, tmp_path, review(patched))
    assert again["allowed"] is True and "patch" not in again
    assert patch_for(patched, namespace="shop", settings=SETTINGS) == []


async def test_bad_annotation_is_rejected_with_the_reason(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    _, pki = secret_dir
    pod = deployment_pod(app_port="8080", inbound_policy="allow GET /api/stock/* from spiffe://Example.org/x\n")
    resp = await admit(server, pki, tmp_path, review(pod))
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"]["code"] == 400
    message = resp["status"]["message"]
    assert "annotation spiffe-sidecar.io/inbound-policy:1: rules[0].callers[0]" in message
    assert "lowercase" in message


async def test_opt_out_and_other_requests_pass_unchanged(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    _, pki = secret_dir
    resp = await admit(server, pki, tmp_path, review(deployment_pod(inject="false", inbound_policy="junk")))
    assert resp == {"uid": resp["uid"], "allowed": True}
    resp = await admit(server, pki, tmp_path, review(deployment_pod(app_port="8080"), operation="UPDATE"))
    assert resp == {"uid": resp["uid"], "allowed": True}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {}}
    resp = await admit(server, pki, tmp_path, review(svc, kind="Service", resource="services"))
    assert resp == {"uid": resp["uid"], "allowed": True}


async def test_warnings_are_short(server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path) -> None:
    _, pki = secret_dir
    resp = await admit(server, pki, tmp_path, review(deployment_pod()))  # no app-port: inferred, with a warning
    assert resp["allowed"] is True and resp["warnings"]
    assert all(len(w) <= 120 for w in resp["warnings"])


async def test_malformed_requests(server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path) -> None:
    _, pki = secret_dir
    assert server.port is not None
    rc, status, text = await curl(server.port, pki.ca_pem, tmp_path, b"{not json")
    assert (rc, status) == (0, 400)
    bad = review(deployment_pod())
    bad["apiVersion"] = "admission.k8s.io/v1beta1"
    rc, status, text = await curl(server.port, pki.ca_pem, tmp_path, json.dumps(bad).encode())
    assert (rc, status) == (0, 400) and "v1" in text
    rc, status, text = await curl(server.port, pki.ca_pem, tmp_path, None, path="/healthz")
    assert (rc, status, text) == (0, 200, "ok\n")


async def test_wrong_name_fails_verification(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    _, pki = secret_dir
    assert server.port is not None
    rc, _, _ = await curl(server.port, pki.ca_pem, tmp_path, None, host="wrong.spiffe-system.svc", path="/healthz")
    assert rc == 60  # what the API server would see: certificate name mismatch


async def test_serving_cert_reloads_on_secret_swap(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    d, old = secret_dir
    assert server.port is not None
    new = make_pki(SVC)
    write_secret(d, new, 2)
    for _ in range(200):  # bounded: the reload loop polls every 0.1 s
        if server.certs.reloads:
            break
        await asyncio.sleep(0.05)
    assert server.certs.reloads == 1
    rc, status, _ = await curl(server.port, new.ca_pem, tmp_path, None, path="/healthz")
    assert (rc, status) == (0, 200)
    rc, _, _ = await curl(server.port, old.ca_pem, tmp_path, None, path="/healthz")
    assert rc == 60  # the old CA no longer verifies: new handshakes got the new context


async def test_half_written_rotation_keeps_the_old_cert(
    server: WebhookServer, secret_dir: tuple[Path, Pki], tmp_path: Path
) -> None:
    d, old = secret_dir
    assert server.port is not None
    other = make_pki(SVC)
    mismatched = Pki(other.ca_pem, other.cert_pem, old.key_pem)  # cert and key do not match
    write_secret(d, mismatched, 2)
    assert server.certs.check() is False and server.certs.reloads == 0
    rc, status, _ = await curl(server.port, old.ca_pem, tmp_path, None, path="/healthz")
    assert (rc, status) == (0, 200)
