"""What every ``pathfed`` command shares: settings, output paths, waiting."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError

log = logging.getLogger("pathfed")

EXIT_BAD_INPUT = 2


def parse_value(text: str) -> Any:
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def settings(config: str | None, sets: Sequence[str], flags: Mapping[str, Any] | None = None,
             ) -> Any:
    """A validated :class:`~common.config.FederationConfig` from defaults < ``--config FILE``
    < ``--set KEY=VALUE`` < ``flags`` (None values are left out)."""
    from common.config import FederationConfig, data_defaults, load_config_file

    values: dict[str, Any] = load_config_file(config) if config else {}
    if not config:  # defaults that learn on this kind of data (image or feature folders)
        data = (flags or {}).get("data") or next(
            (item.partition("=")[2].strip().strip('"') for item in sets
             if item.partition("=")[0].strip() == "data"), None)
        values = data_defaults(data)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set: {item!r} is not KEY=VALUE")
        values[key.strip()] = parse_value(value.strip())
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return FederationConfig.from_mapping(values, config or "settings")


def check_out(out: str) -> None:
    """An output file path must not be a folder, and its folder must exist."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--out: folder {path.parent} does not exist")


def wait(proc: Any, what: str) -> int:
    from common.deployment import stop_process

    def _stop(signum: int, _frame: object) -> None:
        stop_process(proc)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        return int(proc.wait())
    except KeyboardInterrupt:
        log.info("stopping %s", what)
        stop_process(proc)
        return 0
