"""The cluster configs say what Flywheel needs, checked without starting a cluster or touching a cloud.

    pytest tests/test_cluster_config.py -q

`ray-cluster.yaml` is validated against Ray's own cluster-launcher schema (shipped in the installed `ray`) and
by the same `prepare_config` + `validate_config` calls that `ray up` makes before it contacts the cloud. The
KubeRay manifests in `cluster/` are checked by structure. The Flywheel-specific checks are pure functions that
return a list of problems; the mutation tests at the bottom show that each one catches what it is meant to.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import sys

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "ray-cluster.yaml")
CLUSTER_DIR = os.path.join(REPO, "cluster")
SERVE_APP = os.path.join(REPO, "flywheel", "serve", "app.py")

JOB_NAMES = {"curate", "distill", "evaluate", "serve", "monitor", "ingest", "promote"}
SERVE_IMPORT_PATH = "flywheel.serve.app:app_from_env"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
RAY_VERSION = importlib.metadata.version("ray")
PY_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
ENTRYPOINT = re.compile(r"^python jobs/(?P<job>\w+)\.py --config jobs/(?P<config>\w+)\.yaml$")
HOME_IN_COMMAND = re.compile(r"\bFLYWHEEL_HOME=(\S+?);?(?:\s|$)")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the pure-Python loader is slow


# ---------------------------------------------------------------------------------------------------------------
# Loading


def ray_schema() -> dict:
    """Ray's cluster-launcher JSON schema, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations, "ray is not installed in this environment"
    path = os.path.join(spec.submodule_search_locations[0], "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def load_manifests() -> dict[str, list[dict]]:
    """Every YAML file in cluster/, as {file name: [documents]}."""
    found = {}
    for name in sorted(os.listdir(CLUSTER_DIR)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(CLUSTER_DIR, name)) as f:
                found[name] = [doc for doc in yaml.load_all(f, Loader=LOADER) if doc is not None]
    return found


@pytest.fixture(scope="module")
def launcher() -> dict:
    with open(LAUNCHER) as f:
        return yaml.load(f, Loader=LOADER)


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return load_manifests()


# ---------------------------------------------------------------------------------------------------------------
# ray-cluster.yaml: Flywheel's requirements


def _start_line(commands: list[str]) -> str | None:
    return next((c for c in commands if "ray start" in c), None)


def launcher_problems(cfg: dict) -> list[str]:
    """What is wrong with a cluster-launcher config for Flywheel (empty: nothing)."""
    problems = []
    if cfg.get("cluster_name") != "flywheel":
        problems.append(f"cluster_name: expected 'flywheel', got {cfg.get('cluster_name')!r}")
    provider = cfg.get("provider", {})
    if provider.get("type") != "aws" or not provider.get("region"):
        problems.append(f"provider: expected type aws with a region, got {provider!r}")
    if not isinstance(cfg.get("idle_timeout_minutes"), (int, float)):
        problems.append("idle_timeout_minutes: missing")

    types = cfg.get("available_node_types", {})
    head_name = cfg.get("head_node_type")
    head = types.get(head_name)
    if head is None:
        problems.append(f"head_node_type: {head_name!r} is not one of available_node_types {sorted(types)}")
    else:
        res = head.get("resources", {})
        if "CPU" not in res or res.get("GPU", 0):
            problems.append(f"available_node_types.{head_name}.resources: a CPU head declares CPU and no GPU, "
                            f"got {res!r}")
        if head.get("max_workers", 0) != 0:
            problems.append(f"available_node_types.{head_name}.max_workers: the head type launches no workers")

    workers = {name: t for name, t in types.items() if name != head_name}
    gpu_types = {name: t for name, t in workers.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    if not gpu_types:
        problems.append("available_node_types: no worker type with resources {'GPU': >= 1}")
    for name, t in gpu_types.items():
        if t.get("resources", {}).get("CPU", 0) < 1:
            problems.append(f"available_node_types.{name}.resources: a GPU worker declares its CPUs too")
        if t.get("min_workers", 0) != 0 or t.get("max_workers", 0) < 1:
            problems.append(f"available_node_types.{name}: GPU workers scale from min_workers 0 to max_workers "
                            f">= 1, got {t.get('min_workers')}..{t.get('max_workers')}")
        image = t.get("docker", {}).get("worker_image", cfg.get("docker", {}).get("worker_image", ""))
        if not image.endswith("-gpu"):
            problems.append(f"available_node_types.{name}.docker.worker_image: GPU workers need a -gpu (CUDA) "
                            f"image, got {image!r}")
        setup = t.get("worker_setup_commands", cfg.get("worker_setup_commands", []))
        if not any(re.search(r"pip install .*-e .*\.\[gpu\]", c) for c in setup):
            problems.append(f"available_node_types.{name}.worker_setup_commands: install the repo with its gpu "
                            f"extra (pip install -e \".[gpu]\")")

    # max_workers: the global cap is exactly what the worker types add up to, and no type exceeds it.
    total = cfg.get("max_workers", 0)
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if hi is None:
            problems.append(f"available_node_types.{name}.max_workers: set it explicitly")
            continue
        if not 0 <= lo <= hi <= total:
            problems.append(f"available_node_types.{name}: need 0 <= min_workers <= max_workers <= "
                            f"max_workers ({total}), got {lo}..{hi}")
    type_sum = sum(t.get("max_workers", 0) for t in workers.values())
    if total != type_sum:
        problems.append(f"max_workers: {total} is not the sum of the worker types' max_workers ({type_sum})")

    # Token auth stays on, on the same shell line that starts Ray; FLYWHEEL_HOME is one s3:// URI everywhere.
    homes = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        line = _start_line(cfg.get(key, []))
        if line is None:
            problems.append(f"{key}: no `ray start` command")
            continue
        before_start = line[: line.index("ray start")]
        if not re.search(r"\bexport\b[^;]*\bRAY_AUTH_MODE=token\b", before_start):
            problems.append(f"{key}: export RAY_AUTH_MODE=token before `ray start` on the same line, got {line!r}")
        match = HOME_IN_COMMAND.search(before_start)
        homes[key] = match.group(1) if match else None
    if "RAY_AUTH_MODE=disabled" in json.dumps(cfg):
        problems.append("RAY_AUTH_MODE=disabled appears in the config: keep token auth on")
    for key, home in homes.items():
        if not (home or "").startswith("s3://"):
            problems.append(f"{key}: FLYWHEEL_HOME must be an s3:// URI on a cluster, got {home!r}")
    if len(set(homes.values())) > 1:
        problems.append(f"FLYWHEEL_HOME differs between head and workers: {homes}")

    mounts = cfg.get("file_mounts", {})
    if mounts.get("~/flywheel") != ".":
        problems.append("file_mounts: mount the working dir ('~/flywheel': '.')")
    if "~/.ray/auth_token" not in mounts:
        problems.append("file_mounts: share the token with every node ('~/.ray/auth_token')")
    if not any(re.search(r"pip install .*-e \.(\s|$)", c) for c in cfg.get("head_setup_commands", [])):
        problems.append("head_setup_commands: install the repo (cd ~/flywheel && pip install -e .)")

    docker = cfg.get("docker", {})
    for key in ("image", "head_image", "worker_image"):
        if key in docker and not docker[key].startswith(f"rayproject/ray:{RAY_VERSION}-{PY_TAG}"):
            problems.append(f"docker.{key}: Ray and Python must match this environment "
                            f"(rayproject/ray:{RAY_VERSION}-{PY_TAG}...), got {docker[key]!r}")
    return problems


def header_comment(path: str) -> str:
    lines = []
    with open(path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line)
    return "".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# cluster/: Flywheel's requirements


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs a document declares (a RayJob with clusterSelector declares none)."""
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayCluster":
        return [spec]
    if doc.get("kind") == "RayService":
        return [spec.get("rayClusterConfig", {})]
    if doc.get("kind") == "RayJob" and "rayClusterSpec" in spec:
        return [spec["rayClusterSpec"]]
    return []


def _gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def cluster_spec_problems(where: str, spec: dict) -> list[str]:
    problems = []
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}.rayVersion: expected {RAY_VERSION!r} (the installed ray), "
                        f"got {spec.get('rayVersion')!r}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode: must be 'token'")
    head = spec.get("headGroupSpec", {}).get("template", {}).get("spec", {}).get("containers", [])
    if not head:
        problems.append(f"{where}.headGroupSpec: no head container declared")
    elif _gpus(head[0]):
        problems.append(f"{where}.headGroupSpec: the head is a CPU node, it asks for {_gpus(head[0])} GPUs")

    groups = spec.get("workerGroupSpecs", [])
    containers = [(f"{where}.headGroupSpec", c) for c in head[:1]]
    gpu_groups = []
    for group in groups:
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas")
        if hi is None or not 0 <= lo <= n <= hi:
            problems.append(f"{name}: need 0 <= minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        group_containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not group_containers:
            problems.append(f"{name}: no container declared")
            continue
        containers.append((name, group_containers[0]))
        if _gpus(group_containers[0]) >= 1:
            gpu_groups.append(name)
    if not gpu_groups:
        problems.append(f"{where}.workerGroupSpecs: no GPU worker group (resources.limits nvidia.com/gpu >= 1)")

    for name, container in containers:
        env = _env(container)
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{name}: env RAY_AUTH_MODE must be 'token'")
        token_ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if token_ref.get("name") != spec.get("authOptions", {}).get("secretName"):
            problems.append(f"{name}: env RAY_AUTH_TOKEN must come from the authOptions secret")
        home = env.get("FLYWHEEL_HOME", {}).get("value", "")
        if not home.startswith("s3://"):
            problems.append(f"{name}: env FLYWHEEL_HOME must be an s3:// URI, got {home!r}")
    return problems


def dockerfile_workdir() -> str | None:
    with open(os.path.join(CLUSTER_DIR, "Dockerfile")) as f:
        workdirs = re.findall(r"^WORKDIR\s+(\S+)", f.read(), flags=re.M)
    return workdirs[-1] if workdirs else None


def manifest_problems(found: dict[str, list[dict]]) -> list[str]:
    """What is wrong with the KubeRay manifests (empty: nothing)."""
    problems = []
    kinds, clusters, homes = set(), set(), set()
    for fname, docs in found.items():
        if not docs:
            problems.append(f"{fname}: no YAML documents")
        for i, doc in enumerate(docs):
            where = f"{fname}[{i}]"
            if doc.get("apiVersion") != "ray.io/v1":
                problems.append(f"{where}.apiVersion: expected 'ray.io/v1', got {doc.get('apiVersion')!r}")
            if doc.get("kind") not in RAY_KINDS:
                problems.append(f"{where}.kind: expected one of {sorted(RAY_KINDS)}, got {doc.get('kind')!r}")
            meta = doc.get("metadata", {})
            if not (meta.get("name") or meta.get("generateName")):
                problems.append(f"{where}.metadata: needs a name or generateName")
            kinds.add(doc.get("kind"))
            if doc.get("kind") == "RayCluster":
                clusters.add(meta.get("name"))
            for spec in _cluster_specs(doc):
                problems += cluster_spec_problems(f"{where}.spec", spec)
                for group in [spec.get("headGroupSpec", {})] + spec.get("workerGroupSpecs", []):
                    for c in group.get("template", {}).get("spec", {}).get("containers", [])[:1]:
                        homes.add(_env(c).get("FLYWHEEL_HOME", {}).get("value"))
    missing = RAY_KINDS - kinds
    if missing:
        problems.append(f"cluster/: no manifest of kind {sorted(missing)}")
    if len(homes) > 1:
        problems.append(f"cluster/: FLYWHEEL_HOME differs between manifests: {sorted(map(str, homes))}")

    for fname, docs in found.items():
        for i, doc in enumerate(docs):
            where = f"{fname}[{i}].spec"
            spec = doc.get("spec", {})
            if doc.get("kind") == "RayJob":
                problems += rayjob_problems(where, spec, clusters)
            if doc.get("kind") == "RayService":
                problems += rayservice_problems(where, spec)
    return problems


def rayjob_problems(where: str, spec: dict, clusters: set) -> list[str]:
    problems = []
    entry = spec.get("entrypoint", "")
    match = ENTRYPOINT.match(entry.strip())
    if not match:
        problems.append(f"{where}.entrypoint: expected `python jobs/<name>.py --config jobs/<name>.yaml`, "
                        f"got {entry!r}")
    elif match["job"] not in JOB_NAMES or match["config"] != match["job"]:
        problems.append(f"{where}.entrypoint: runs jobs/{match['job']}.py with jobs/{match['config']}.yaml; "
                        f"expected one of {sorted(JOB_NAMES)} with its own config")
    selected = spec.get("clusterSelector", {}).get("ray.io/cluster")
    if selected is None and "rayClusterSpec" not in spec:
        problems.append(f"{where}: neither clusterSelector (ray.io/cluster) nor rayClusterSpec")
    if selected is not None and selected not in clusters:
        problems.append(f"{where}.clusterSelector: RayCluster {selected!r} is not declared in cluster/ "
                        f"(found {sorted(clusters)})")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    if runtime_env.get("working_dir") != dockerfile_workdir():
        problems.append(f"{where}.runtimeEnvYAML.working_dir: {runtime_env.get('working_dir')!r} is not where "
                        f"cluster/Dockerfile puts the repo ({dockerfile_workdir()!r}); jobs/... would not resolve")
    return problems


def rayservice_problems(where: str, spec: dict) -> list[str]:
    problems = []
    serve = yaml.safe_load(spec.get("serveConfigV2") or "{}") or {}
    apps = serve.get("applications", [])
    paths = [a.get("import_path") for a in apps]
    if SERVE_IMPORT_PATH not in paths:
        problems.append(f"{where}.serveConfigV2: no application with import_path {SERVE_IMPORT_PATH!r}, "
                        f"got {paths}")
    if serve.get("http_options", {}).get("host") != "0.0.0.0":
        problems.append(f"{where}.serveConfigV2.http_options.host: must be 0.0.0.0 to be reachable in the pod")
    for app in apps:
        if app.get("import_path") == SERVE_IMPORT_PATH:
            problems += serve_settings_problems(f"{where}.serveConfigV2.applications[{app.get('name')}].args",
                                                app.get("args") or {})
    return problems


def serve_settings_problems(where: str, settings: dict) -> list[str]:
    """The engine and autoscaling settings a cluster config carries must be the code's (ServeConfig defaults)."""
    from flywheel.config import ConfigError, ServeConfig, build
    from flywheel.serve.autoscale import SCALING_FIELDS

    problems = []
    try:
        build(ServeConfig, {k: v for k, v in settings.items() if k != "auth"})
    except ConfigError as e:
        problems.append(f"{where}: not a valid ServeConfig: {e}")
    defaults = ServeConfig()
    for key in ("engine", *SCALING_FIELDS):
        if key not in settings:
            problems.append(f"{where}.{key}: missing (the code's default is {getattr(defaults, key)!r})")
        elif settings[key] != getattr(defaults, key):
            problems.append(f"{where}.{key}: {settings[key]!r} differs from the code's default "
                            f"{getattr(defaults, key)!r} (flywheel/config/serving.py ServeConfig)")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Tests: ray-cluster.yaml


def test_launcher_matches_rays_schema(launcher):
    jsonschema.validate(launcher, ray_schema())


def test_launcher_passes_the_checks_ray_up_runs(launcher):
    """`ray up` calls prepare_config then validate_config before it touches the cloud (no credentials needed)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_launcher_has_what_flywheel_needs(launcher):
    assert launcher_problems(launcher) == []


def test_launcher_header_shows_the_commands(launcher):
    header = header_comment(LAUNCHER)
    for command in ("ray up ray-cluster.yaml", "ray down ray-cluster.yaml",
                    "ray job submit --address http://<head>:8265 --working-dir . -- "
                    "python jobs/curate.py --config jobs/curate.yaml"):
        assert command in header, f"ray-cluster.yaml's top comment lacks `{command}`"
    assert "FLYWHEEL_HOME" in header and "s3://" in header
    named = set(re.findall(r"jobs/(\w+)\.py", header))
    assert named and named <= JOB_NAMES, f"the top comment names unknown jobs: {sorted(named - JOB_NAMES)}"


# ---------------------------------------------------------------------------------------------------------------
# Tests: cluster/


def test_manifests_declare_what_flywheel_needs(manifests):
    assert set(manifests) >= {"raycluster.yaml", "rayjob-curate.yaml", "rayservice.yaml"}
    assert manifest_problems(manifests) == []


def test_manifest_homes_match_the_launcher(manifests, launcher):
    line = _start_line(launcher["head_start_ray_commands"])
    launcher_home = HOME_IN_COMMAND.search(line).group(1)
    for fname, docs in manifests.items():
        for doc in docs:
            for spec in _cluster_specs(doc):
                head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
                assert _env(head)["FLYWHEEL_HOME"]["value"] == launcher_home, fname


def test_serve_settings_match_the_code(manifests, launcher):
    """rayservice.yaml's app args and ray-cluster.yaml's metadata carry the engine and autoscaling of ServeConfig."""
    service = _find(manifests, "rayservice.yaml", "RayService")
    assert rayservice_problems("rayservice.yaml.spec", service["spec"]) == []
    assert serve_settings_problems("ray-cluster.yaml.metadata.flywheel_serve",
                                   launcher.get("metadata", {}).get("flywheel_serve", {})) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda s: s.update(teacher_max_replicas=2), "teacher_max_replicas: 2 differs from the code's default"),
    (lambda s: s.pop("downscale_delay_s"), "downscale_delay_s: missing"),
    (lambda s: s.update(engine="trt"), "not a valid ServeConfig"),
    (lambda s: s.update(student_max_replicas=-1), "not a valid ServeConfig"),
])
def test_serve_settings_checks_catch(launcher, mutate, expected):
    settings = copy.deepcopy(launcher["metadata"]["flywheel_serve"])
    mutate(settings)
    problems = serve_settings_problems("x", settings)
    assert any(expected in p for p in problems), problems


def test_serve_app_builder_takes_one_argument():
    """Ray Serve calls an application builder with exactly one argument (the `args` mapping)."""
    if not os.path.exists(SERVE_APP):
        pytest.skip("flywheel/serve/app.py is not written yet")
    with open(SERVE_APP) as f:
        tree = ast.parse(f.read())
    builders = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "app_from_env"]
    assert builders, f"{SERVE_APP} defines no top-level app_from_env (cluster/rayservice.yaml imports it)"
    a = builders[0].args
    positional = len(a.posonlyargs) + len(a.args)
    required_kwonly = sum(d is None for d in a.kw_defaults)
    assert positional == 1 and not a.vararg and required_kwonly == 0, \
        "app_from_env must take exactly one parameter: Ray Serve calls it with the args dict"


# ---------------------------------------------------------------------------------------------------------------
# The checks catch what they are meant to catch.


def test_schema_rejects_an_unknown_key(launcher):
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu_worker"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].pop("GPU"), "no worker type with resources"),
    (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1), "a CPU head declares CPU and no GPU"),
    (lambda c: c.update(max_workers=3), "is not the sum of the worker types"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")),
     "export RAY_AUTH_MODE=token before `ray start`"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(
        1, c["worker_start_ray_commands"][1].replace("s3://", "/tmp/")), "must be an s3:// URI"),
    (lambda c: c["docker"].update(head_image="rayproject/ray:2.9.0-py310-cpu"), "Ray and Python must match"),
])
def test_launcher_checks_catch(launcher, mutate, expected):
    broken = copy.deepcopy(launcher)
    mutate(broken)
    problems = launcher_problems(broken)
    assert any(expected in p for p in problems), problems


def _find(found, fname, kind):
    return next(d for d in found[fname] if d["kind"] == kind)


@pytest.mark.parametrize("mutate, expected", [
    (lambda f: _find(f, "raycluster.yaml", "RayCluster")["spec"]["workerGroupSpecs"].pop(), "no GPU worker group"),
    (lambda f: _find(f, "rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
     ["template"]["spec"]["containers"][0]["env"].pop(0), "env RAY_AUTH_MODE must be 'token'"),
    (lambda f: _find(f, "rayjob-curate.yaml", "RayJob")["spec"].update(
        entrypoint="python jobs/train_all.py --config jobs/train_all.yaml"), "expected one of"),
    (lambda f: _find(f, "rayjob-curate.yaml", "RayJob")["spec"].update(entrypoint="python curate.py"),
     "expected `python jobs/<name>.py"),
    (lambda f: _find(f, "rayjob-curate.yaml", "RayJob")["spec"].update(clusterSelector={"ray.io/cluster": "x"}),
     "is not declared in cluster/"),
    (lambda f: _find(f, "rayservice.yaml", "RayService")["spec"].update(serveConfigV2="applications: []"),
     "no application with import_path"),
    (lambda f: f["raycluster.yaml"][0].update(apiVersion="ray.io/v1alpha1"), "expected 'ray.io/v1'"),
])
def test_manifest_checks_catch(manifests, mutate, expected):
    broken = copy.deepcopy(manifests)
    mutate(broken)
    problems = manifest_problems(broken)
    assert any(expected in p for p in problems), problems
