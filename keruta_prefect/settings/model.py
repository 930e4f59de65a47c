"""`application.properties` → validated :class:`KerutaSettings`.

Every setting is declared once, here, with its property key, default and description. The Prefect
Block (`keruta_prefect.blocks`) inherits these fields, so the Prefect UI form, `settings show`, the
README table and the parser can never disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import javaproperties
from javaproperties.util import ascii_splitlines
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from keruta_prefect.validation import (
    check_dns_label,
    check_image,
    check_quantity,
    one_line,
    parse_byte_size,
    shorten,
)


class SettingsError(ValueError):
    """A bad settings file or value; ``str()`` is one line naming the key, the value and the rule."""


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _json_list(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON list, e.g. [{\"key\": \"gpu\", \"operator\": \"Exists\"}]") from None
    return value


def _split_map(value: Any) -> Any:
    if isinstance(value, str):
        result: dict[str, str] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError("expected key=value pairs separated by commas")
            key, _, val = part.partition("=")
            result[key.strip()] = val.strip()
        return result
    return value


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
OptionalStr = Annotated[str | None, BeforeValidator(_blank_to_none)]
StrList = Annotated[list[str], BeforeValidator(_split_list)]
StrMap = Annotated[dict[str, str], BeforeValidator(_split_map)]
JsonList = Annotated[list[dict[str, Any]], BeforeValidator(_json_list)]
AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


def _key(prop: str, description: str, default: Any, **kw: Any) -> Any:
    """A field whose property key is recorded in its JSON schema (`property`)."""
    return Field(default, description=f"{description} (`{prop}`)", json_schema_extra={"property": prop}, **kw)


K = "keruta.kubernetes."


class KerutaSettings(BaseModel):
    """Everything keruta-prefect needs to build and run agent Jobs. Secrets live elsewhere."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    # --- the seed's and the original admin screen's keys -------------------------------------------
    enabled: bool = _key(K + "enabled", "Kubernetes integration on or off", True)
    config_path: OptionalStr = _key(
        K + "config-path", "kubeconfig file; empty means $KUBECONFIG or ~/.kube/config", None
    )
    in_cluster: bool = _key(K + "in-cluster", "use the Pod's service account instead of a kubeconfig", False)
    context: OptionalStr = _key(K + "context", "kubeconfig context; empty means the current one", None)
    default_namespace: str = _key(K + "default-namespace", "namespace for Jobs of tasks that name none", "default")
    api_url: str = _key(K + "api-url", "keruta API base URL as agent Pods reach it", "http://keruta-api:8080")
    api_port: int = _key(K + "api-port", "port `keruta-prefect api` listens on", 8080, ge=1, le=65535)
    default_image: str = _key(K + "default-image", "agent image for tasks that name none", "keruta-agent:latest")
    default_pvc_storage_size: str = _key(
        K + "default-pvc-storage-size", "size of a repository task's volume", "1Gi"
    )
    default_pvc_access_mode: AccessMode = _key(
        K + "default-pvc-access-mode", "access mode of a repository task's volume", "ReadWriteOnce"
    )
    default_pvc_storage_class: OptionalStr = _key(
        K + "default-pvc-storage-class", "storage class of task volumes; empty means the cluster default", None
    )
    # --- what the Job needs beyond the original ----------------------------------------------------
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = _key(
        K + "image-pull-policy", "pull policy of the agent container", "IfNotPresent"
    )
    image_pull_secrets: StrList = _key(
        K + "image-pull-secrets", "comma-separated Secret names for private registries", []
    )
    service_account: OptionalStr = _key(
        K + "service-account", "service account of agent Pods; empty means the namespace default", None
    )
    token_secret_name: str = _key(
        K + "token-secret-name", "Secret holding the keruta API token for agents", "keruta-api-token"
    )
    token_secret_key: str = _key(K + "token-secret-key", "key of the token in that Secret", "token")
    default_cpu_request: OptionalStr = _key(K + "default-cpu-request", "agent CPU request; empty: none", "100m")
    default_memory_request: OptionalStr = _key(
        K + "default-memory-request", "agent memory request; empty: none", "128Mi"
    )
    default_cpu_limit: OptionalStr = _key(K + "default-cpu-limit", "agent CPU limit; empty: none", None)
    default_memory_limit: OptionalStr = _key(
        K + "default-memory-limit", "agent memory limit; empty: none", "1Gi"
    )
    node_selector: StrMap = _key(K + "node-selector", "node selector for agent Pods, as k=v,k2=v2", {})
    tolerations: JsonList = _key(K + "tolerations", "tolerations of agent Pods, as a JSON list", [])
    git_image: str = _key(K + "git-image", "image of the init container that clones a task's repository",
                          "alpine/git:2.47.2")
    image_pull_grace_seconds: int = _key(
        K + "image-pull-grace-seconds", "seconds an image may fail to pull before the task fails", 30, ge=0
    )
    ttl_seconds_after_finished: int = _key(
        K + "ttl-seconds-after-finished", "seconds a finished Job is kept before Kubernetes deletes it", 3600,
        ge=0,
    )
    backoff_limit: int = _key(K + "backoff-limit", "Job-level Pod retries (retries belong to Prefect)", 0, ge=0)
    description_env_limit: int = _key(
        K + "description-env-limit",
        "bytes of the description put in KERUTA_TASK_DESCRIPTION (the agent can fetch the rest)",
        4096,
        ge=64,
    )
    pvc_retention: Literal["delete", "keep"] = _key(
        K + "pvc-retention", "delete a task tree's volume when its root task ends, or keep it", "delete"
    )
    # --- tasks and the dispatcher ------------------------------------------------------------------
    task_default_timeout: int = _key(
        "keruta.task.default-timeout", "seconds a task may run when it sets no timeout", 3600, ge=1
    )
    task_max_attempts: int = _key(
        "keruta.task.max-attempts", "attempts per task when an attempt fails for a system reason", 3, ge=1
    )
    processing_delay_ms: int = _key(
        "keruta.task.processor.processing-delay",
        "milliseconds between dispatcher runs (keruta-dispatch follows it on its next run)", 5000, ge=100
    )
    processor_concurrency: int = _key(
        "keruta.task.processor.concurrency",
        "slots of the Prefect global concurrency limit `keruta-tasks` when it is created (then edit it in the UI)",
        10, ge=1, le=10000,
    )
    monitoring_delay_ms: int = _key(
        "keruta.task.processor.monitoring-delay", "milliseconds between monitor checks", 10000, ge=100
    )
    crash_loop_back_off_timeout_ms: int = _key(
        "keruta.task.processor.crash-loop-back-off-timeout",
        "milliseconds a Pod may stay in a crash/pull back-off before the task fails",
        300000,
        ge=0,
    )
    # --- artifacts ---------------------------------------------------------------------------------
    artifacts_mode: Literal["exec", "upload", "off"] = _key(
        "keruta.artifacts.mode", "how files leave the agent Pod: exec (tar), upload (HTTP) or off", "exec"
    )
    artifacts_dir: str = _key(
        "keruta.artifacts.dir", "directory the agent collects files from (KERUTA_ARTIFACTS_DIR)", "/.keruta/doc"
    )
    artifacts_max_file_size: ByteSize = _key(
        "keruta.artifacts.max-file-size", "largest single artifact file kept", 100 * 2**20
    )
    artifacts_max_total_size: ByteSize = _key(
        "keruta.artifacts.max-total-size", "largest total of a task's artifacts kept", 2**30
    )
    artifacts_storage_root: OptionalStr = _key(
        "keruta.artifacts.storage-root", "where collected files are stored; empty: $KERUTA_HOME/artifacts", None
    )
    artifacts_hold_timeout: int = _key(
        "keruta.artifacts.hold-timeout", "seconds the agent keeps its Pod open for collection", 300, ge=0
    )
    # --- the local backend and logs ----------------------------------------------------------------
    local_work_root: OptionalStr = _key(
        "keruta.local.work-root", "work directories of local runs; empty: $KERUTA_HOME/work", None
    )
    prefect_log_max_lines: int = _key(
        "keruta.logs.prefect-max-lines", "task log lines also sent to the Prefect run log (all are stored)",
        10000, ge=0,
    )

    @field_validator("default_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_dns_label(value)

    @field_validator("default_image", "git_image")
    @classmethod
    def _image(cls, value: str) -> str:
        return check_image(value)

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"key", "operator", "value", "effect", "tolerationSeconds"}
        for item in value:
            if not isinstance(item, dict) or not set(item) <= allowed:
                raise ValueError(f"each toleration is an object with keys from {sorted(allowed)}")
        return value

    @field_validator("default_pvc_storage_size")
    @classmethod
    def _pvc_size(cls, value: str) -> str:
        return check_quantity(value)

    @field_validator("default_cpu_request", "default_memory_request", "default_cpu_limit", "default_memory_limit")
    @classmethod
    def _resources(cls, value: str | None) -> str | None:
        return None if value is None else check_quantity(value)

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) < 8 or " " in value:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("artifacts_dir")
    @classmethod
    def _abs_dir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("image_pull_secrets")
    @classmethod
    def _secrets(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 253 or not name or not name.replace(".", "").replace("-", "").isalnum():
                raise ValueError(f"{name!r} is not a valid Secret name")
        return value

    # --- derived paths (never stored: they depend on the machine that runs the flow) -------------
    def storage_root(self) -> Path:
        return Path(self.artifacts_storage_root) if self.artifacts_storage_root else keruta_home() / "artifacts"

    def work_root(self) -> Path:
        return Path(self.local_work_root) if self.local_work_root else keruta_home() / "work"


def keruta_home() -> Path:
    return Path(os.environ.get("KERUTA_HOME") or Path.home() / ".keruta").expanduser()


def property_keys() -> dict[str, str]:
    """Property key → field name, for every setting."""
    keys = {}
    for name, info in KerutaSettings.model_fields.items():
        extra = info.json_schema_extra
        assert isinstance(extra, dict)
        keys[str(extra["property"])] = name
    return keys


PROPERTY_KEYS = property_keys()
FIELD_TO_KEY = {field: key for key, field in PROPERTY_KEYS.items()}


def settings_from_mapping(values: Mapping[str, str], *, warn: list[str] | None = None) -> KerutaSettings:
    """Validate property values (key → string). Unknown `keruta.*` keys are reported in ``warn``."""
    fields: dict[str, str] = {}
    unknown = []
    for key, value in values.items():
        if key in PROPERTY_KEYS:
            fields[PROPERTY_KEYS[key]] = value
        elif key.startswith("keruta."):
            unknown.append(key)
    if unknown and warn is not None:
        warn.append(f"unknown keruta settings ignored: {', '.join(sorted(unknown))}")
    try:
        return KerutaSettings.model_validate(fields)
    except ValidationError as exc:
        raise SettingsError(one_line(exc, names=FIELD_TO_KEY)) from None


def parse_properties(data: bytes, *, source: str = "properties") -> dict[str, str]:
    """Parse Java properties text with `javaproperties` (escapes, continuations, \\uXXXX).

    Rejects, in one line naming the line, key and value: bytes that are not UTF-8, a malformed
    ``\\u`` escape, a value that is not text (a lone UTF-16 surrogate escape), and keys set twice.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SettingsError(f"{source}: line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    result: dict[str, str] = {}
    line = 1  # the first line of the element being parsed
    elements = javaproperties.parse(text)
    while True:
        try:
            element = next(elements, None)
        except javaproperties.InvalidUEscapeError as exc:
            raise SettingsError(_escape_error(text, line, source, exc.escape)) from None
        if element is None:
            return result
        line += len(ascii_splitlines(element.source))
        if not isinstance(element, javaproperties.KeyValue):
            continue
        key, value = element.key, element.value
        if not (_is_text(key) and _is_text(value)):
            name = key if _is_text(key) else shorten(key)
            raise SettingsError(f"{source}: {name}={shorten(value)}: a \\uD800-\\uDFFF escape that is not half "
                                "of a pair; write the character itself")
        if key in result and result[key] != value:
            raise SettingsError(
                f"{source}: {key} is set twice ({shorten(result[key])} and {shorten(value)}); keep one"
            )
        result[key] = value


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escape_error(text: str, line: int, source: str, escape: str) -> str:
    """The line as written (no escapes decoded: that is where the mistake is), cut if long."""
    lines = ascii_splitlines(text)
    raw = lines[line - 1].strip(" \t\f\r\n") if 0 < line <= len(lines) else ""
    if len(raw) > 100:
        raw = raw[:95] + "…" + raw[-4:]
    return f"{source}: line {line}: {raw}: invalid escape {escape} (write \\u and four hex digits, e.g. \\u00e9)"


def load_properties_file(path: str | os.PathLike[str], *, warn: list[str] | None = None) -> KerutaSettings:
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise SettingsError(f"cannot read properties file {str(file)!r}: {exc.strerror}") from None
    return settings_from_mapping(parse_properties(data, source=str(file)), warn=warn)


def settings_to_properties(settings: KerutaSettings) -> dict[str, str]:
    """The inverse of parsing: every key with its value as text (lists and maps comma-joined)."""
    out = {}
    for field, key in FIELD_TO_KEY.items():
        value = getattr(settings, field)
        if value is None:
            text = ""
        elif isinstance(value, bool):
            text = str(value).lower()
        elif field == "tolerations":
            text = json.dumps(value) if value else ""
        elif isinstance(value, list):
            text = ",".join(value)
        elif isinstance(value, dict):
            text = ",".join(f"{k}={v}" for k, v in value.items())
        elif field in _BYTE_FIELDS:
            text = _format_bytes(value)
        else:
            text = str(value)
        out[key] = text
    return out


_BYTE_FIELDS = {"artifacts_max_file_size", "artifacts_max_total_size"}


def _format_bytes(value: int) -> str:
    for suffix, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value and value % factor == 0:
            return f"{value // factor}{suffix}"
    return str(value)


def settings_markdown_table() -> str:
    """The README's configuration table, generated from the fields (a test keeps README in sync)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = settings_to_properties(KerutaSettings())
    for field, key in FIELD_TO_KEY.items():
        info = KerutaSettings.model_fields[field]
        description = (info.description or "").rsplit(" (`", 1)[0]
        default = defaults[key]
        rows.append(f"| `{key}` | {('`' + default + '`') if default else '(empty)'} | {description} |")
    return "\n".join(rows) + "\n"


def settings_properties_file() -> str:
    """blocks/application.properties: every key with its description and default (kept in sync by a test)."""
    defaults = settings_to_properties(KerutaSettings())
    out = [
        "# keruta-prefect settings: every key with its default (`keruta-prefect settings keys --format properties`).",
        "# `keruta-prefect blocks seed --properties blocks/application.properties` stores them in the Prefect",
        "# block `keruta-kubernetes-settings/default` if it does not exist yet; after that the block (editable",
        "# in the Prefect UI) wins over this file. `--force` overwrites the block with this file.",
        '# Empty values mean "not set" (see each description).',
    ]
    section = None
    for field, key in FIELD_TO_KEY.items():
        group = key.rsplit(".", 1)[0]
        if group != section:
            out += ["", f"# --- {group} ---"]
            section = group
        description = (KerutaSettings.model_fields[field].description or "").rsplit(" (`", 1)[0]
        out += [f"# {description}", f"{key}={defaults[key]}"]
    return "\n".join(out) + "\n"
