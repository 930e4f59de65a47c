"""Prefect Blocks for keruta settings and the keruta API credentials, and `seed()`.

The settings Block *is* :class:`KerutaSettings` (it inherits its fields, descriptions and validators),
so the Prefect UI form edits exactly what `application.properties` sets. Seeding creates a block
document only if none exists: an edit made in the Prefect UI survives every restart and re-seed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl, SecretStr, ValidationError

from keruta_prefect.contract import Env
from keruta_prefect.settings import KerutaSettings, SettingsError
from keruta_prefect.validation import check_block_name, one_line, shorten

DEFAULT_BLOCK = "default"
B = TypeVar("B", bound=Block)


class KerutaKubernetesSettings(Block, KerutaSettings):
    """keruta-prefect settings: the cluster connection and everything an agent Job is built from.

    Seeded from `application.properties` (`keruta-prefect blocks seed`); edit it here afterwards.
    """

    _block_type_name = "Keruta Kubernetes Settings"
    _block_type_slug = "keruta-kubernetes-settings"
    _description = (
        "How keruta-prefect runs keruta tasks: cluster connection, namespace, agent image, volumes, "
        "resources and artifact limits. Seeded once from application.properties; edits here win."
    )
    _documentation_url = HttpUrl("https://github.com/keruta/keruta-prefect#configuration")

    def settings(self) -> KerutaSettings:
        return KerutaSettings.model_validate(self.model_dump(include=set(KerutaSettings.model_fields)))


class KerutaApiCredentials(Block):
    """Where the keruta API is and the token agents and clients present to it."""

    _block_type_name = "Keruta API"
    _block_type_slug = "keruta-api"
    _description = "The keruta API's URL and bearer token (stored encrypted, shown obfuscated)."

    url: str = Field("http://keruta-api:8080", description="keruta API base URL as flows and the CLI reach it")
    token: SecretStr = Field(description="bearer token of the keruta API (Secret `keruta-api-token` in the cluster)")


def _register(block_cls: type[Block]) -> None:
    """Register a block type and schema. Prefect reads, then creates if absent: when another process
    creates them between the two, the server answers 409 and a second pass finds them."""
    from prefect.exceptions import ObjectAlreadyExists

    for attempt in (1, 2, 3):  # a type, then a schema, can each be taken by another process once
        try:
            block_cls.register_type_and_schema()
            return
        except ObjectAlreadyExists:
            if attempt == 3:
                raise


def register_block_types() -> None:
    _register(KerutaKubernetesSettings)
    _register(KerutaApiCredentials)


@dataclass
class SeedReport:
    settings_created: bool
    api_created: bool
    token_generated: bool
    name: str

    def lines(self) -> list[str]:
        def word(created: bool) -> str:
            return "created" if created else "kept (already present; use --force to overwrite)"

        out = [
            f"{KerutaKubernetesSettings._block_type_slug}/{self.name}: {word(self.settings_created)}",
            f"{KerutaApiCredentials._block_type_slug}/{self.name}: {word(self.api_created)}",
        ]
        if self.token_generated:
            out.append("a new API token was generated; put it in the cluster's Secret keruta-api-token (key token)")
        return out


def check_name(name: str, what: str = "block name") -> str:
    try:
        return check_block_name(name)
    except ValueError as exc:
        raise SettingsError(f"{what} {shorten(name)}: must be {exc}") from None


def _create(block: Block, name: str, *, overwrite: bool) -> bool:
    """Store ``block`` as ``name``; without ``overwrite`` only if absent. True if this call wrote it.

    Create-if-absent is one request (the server answers 409 on a name in use), never read-then-write:
    of two seeders racing, the second never overwrites what the first stored, nor an edit made since.
    """
    from prefect.exceptions import ObjectAlreadyExists

    try:
        block.save(name, overwrite=overwrite)
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectAlreadyExists):
            return False
        raise
    return True


def seed(settings: KerutaSettings, *, name: str = DEFAULT_BLOCK, force: bool = False,
         token: str | None = None) -> SeedReport:
    """Register the block types and create the documents named ``name`` if absent (or replace them if ``force``)."""
    check_name(name)
    register_block_types()
    settings_created = _create(KerutaKubernetesSettings(**settings.model_dump()), name, overwrite=force)
    value = token or os.environ.get(Env.API_TOKEN)
    generated = not value
    api = KerutaApiCredentials(url=settings.api_url, token=SecretStr(value or secrets.token_urlsafe(32)))
    api_created = _create(api, name, overwrite=force)
    return SeedReport(settings_created, api_created, generated and api_created, name)


def _read(block_cls: type[B], name: str) -> B | None:
    """The stored block ``name`` (None if absent). A document that no longer validates (edited in the UI
    or through the API) raises SettingsError: one line naming the block, the field and the value."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    check_name(name)
    slug = block_cls.get_block_type_slug()
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, slug, include_secrets=True)
        except ObjectNotFound:
            return None
    data = {key: value for key, value in document.data.items() if key in block_cls.model_fields}
    try:
        return block_cls.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(one_line(exc, prefix=f"block {slug}/{name}: ")) from None


def read_settings(name: str = DEFAULT_BLOCK) -> KerutaSettings | None:
    """The stored settings block ``name``, or None if there is none (SettingsError if it is invalid)."""
    block = _read(KerutaKubernetesSettings, name)
    return None if block is None else block.settings()


def read_api_credentials(name: str = DEFAULT_BLOCK) -> KerutaApiCredentials | None:
    return _read(KerutaApiCredentials, name)


_SHARED: ContextVar[tuple[str, KerutaSettings] | None] = ContextVar("keruta_shared_settings", default=None)


@contextmanager
def shared_settings(name: str, settings: KerutaSettings) -> Iterator[None]:
    """While it lasts, :func:`load_settings` of block ``name`` answers ``settings`` in this context and in the
    task runs and child flow runs started from it (Prefect's task runners carry the context): a pipeline's
    children run with the settings the pipeline read — one configuration for one pipeline, an edit in the UI
    applying from the next — and none of them reads the block again."""
    token = _SHARED.set((name, settings))
    try:
        yield
    finally:
        _SHARED.reset(token)


def load_settings(name: str = DEFAULT_BLOCK, *, properties: str | None = None) -> KerutaSettings:
    """The stored settings; on first use, seed them from ``properties`` (or $KERUTA_PROPERTIES, or the
    defaults) — as the original created its stored copy on first read. A stored block that does not
    validate raises SettingsError (one line naming the field and the value); it is never replaced.
    Inside :func:`shared_settings` of the same block, the settings it shares."""
    shared = _SHARED.get()
    if shared is not None and shared[0] == name and properties is None:
        return shared[1]
    stored = read_settings(name)
    if stored is not None:
        return stored
    from keruta_prefect.settings import load_properties_file

    path = properties or os.environ.get("KERUTA_PROPERTIES")
    settings = load_properties_file(path) if path else KerutaSettings()
    seed(settings, name=name)
    stored = read_settings(name)  # ours, or what a concurrent first run stored a moment before
    if stored is None:
        raise SettingsError(f"block {KerutaKubernetesSettings.get_block_type_slug()}/{name}: deleted while seeding")
    return stored
