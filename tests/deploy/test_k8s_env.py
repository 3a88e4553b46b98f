"""The Kubernetes manifests only set environment variables that some fedhub setting reads.

A misspelt `FEDHUB_*` name is silently ignored by pydantic-settings, so a typo in a manifest would
ship a default instead of the intended value; this test catches it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_settings import BaseSettings

from services.aggregator.settings import AggregatorSettings
from services.api.settings import ApiSettings
from services.notifier.settings import NotifierSettings
from services.orchestrator.settings import OrchestratorSettings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS: tuple[type[BaseSettings], ...] = (
    ApiSettings,
    OrchestratorSettings,
    AggregatorSettings,
    NotifierSettings,
)


def _env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = set()
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        names.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def _manifest_names() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted((ROOT / "deploy").rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ""}:
            for name in re.findall(r"\bFEDHUB_[A-Z0-9_]+\b", path.read_text()):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_manifests_set_some_fedhub_settings() -> None:
    assert "FEDHUB_DATABASE_URL" in _manifest_names()


def test_every_fedhub_variable_in_the_manifests_is_read_by_a_setting() -> None:
    known = set().union(*(_env_names(cls) for cls in SETTINGS))
    unknown = {name: where for name, where in _manifest_names().items() if name not in known}
    assert unknown == {}, f"set in deploy/ but read by no setting: {unknown}"
