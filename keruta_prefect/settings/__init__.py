"""`application.properties` → validated :class:`KerutaSettings`.

Every setting is declared once, in ``model``, with its property key, default and description. The Prefect
Block (`keruta_prefect.blocks`) inherits these fields, so the Prefect UI form, `settings show`, the
README table and the parser can never disagree.

- ``values``: the kinds of value (sizes, lists, maps, JSON) and :class:`SettingsError`;
- ``model``: :class:`KerutaSettings`, by section (cluster, agent Job, tasks, artifacts, local backend);
- ``properties``: parsing, loading and writing `application.properties`;
- ``docs``: the README's table and the default properties file, generated from the fields.
"""

from keruta_prefect.settings.docs import settings_markdown_table, settings_properties_file
from keruta_prefect.settings.model import (
    CREDENTIALS_BLOCK_TYPES,
    ArtifactSettings,
    ClusterSettings,
    JobSettings,
    KerutaSettings,
    LocalSettings,
    ReconcileSettings,
    TaskSettings,
    credentials_block_ref,
    keruta_home,
)
from keruta_prefect.settings.properties import (
    FIELD_TO_KEY,
    PROPERTY_KEYS,
    load_properties_file,
    parse_properties,
    property_keys,
    settings_from_mapping,
    settings_to_properties,
)
from keruta_prefect.settings.values import (
    AccessMode,
    ByteSize,
    JsonList,
    OptionalStr,
    SettingsError,
    StrList,
    StrMap,
)

__all__ = [
    "CREDENTIALS_BLOCK_TYPES",
    "FIELD_TO_KEY",
    "PROPERTY_KEYS",
    "AccessMode",
    "ArtifactSettings",
    "ByteSize",
    "ClusterSettings",
    "JobSettings",
    "JsonList",
    "KerutaSettings",
    "LocalSettings",
    "OptionalStr",
    "ReconcileSettings",
    "SettingsError",
    "StrList",
    "StrMap",
    "TaskSettings",
    "credentials_block_ref",
    "keruta_home",
    "load_properties_file",
    "parse_properties",
    "property_keys",
    "settings_from_mapping",
    "settings_markdown_table",
    "settings_properties_file",
    "settings_to_properties",
]
