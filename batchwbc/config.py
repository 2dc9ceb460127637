"""Lab-configurable thresholds: flag cut-offs, review options and reference ranges.

Every number that turns a count into a flag lives here, with a default a haematology lab
would recognise (sources in docs/report.md), so a lab can adapt them with one TOML file
(`--config FILE`) instead of editing code. Unknown keys and wrong types are errors, never
silently ignored: a typo in a safety threshold must not fall back to a default unnoticed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import catalogue


class ConfigError(Exception):
    """A config file that cannot be used; str(exc) is one sentence naming the file and key."""


def _ranges(pairs: dict[str, tuple[float, float]]) -> Mapping[str, tuple[float, float]]:
    return MappingProxyType(dict(pairs))


#: Adult peripheral-blood reference ranges, % of WBC (see docs/report.md for sources).
#: Reference intervals are lab-specific: labs should replace these with their own.
DEFAULT_REFERENCE_RANGES: Mapping[str, tuple[float, float]] = _ranges(
    {
        "neutrophil_segmented": (40.0, 80.0),
        "neutrophil_band": (0.0, 5.0),
        "lymphocyte": (20.0, 40.0),
        "monocyte": (2.0, 10.0),
        "eosinophil": (1.0, 6.0),
        "basophil": (0.0, 2.0),
        "myeloblast": (0.0, 0.0),
        "promyelocyte": (0.0, 0.0),
        "myelocyte": (0.0, 0.0),
        "metamyelocyte": (0.0, 0.0),
    }
)


@dataclass(frozen=True)
class Settings:
    """Thresholds for flags and review; comparison direction is part of each name's meaning."""

    blasts_present_min_count: int = 1  # BLASTS_PRESENT when blasts >= this many cells
    blasts_high_pct: float = 20.0  # BLASTS_HIGH when blasts % of WBC >= this (WHO 2022 AML)
    ig_high_pct: float = 2.0  # IG_HIGH when IG % of WBC > this
    bands_high_pct: float = 10.0  # BANDS_HIGH when band % of WBC > this
    nrbc_present_min_count: int = 1  # NRBC_PRESENT when erythroblasts >= this many cells
    min_wbc: int = 100  # LOW_WBC when fewer WBC than this were classified
    low_confidence_high_pct: float = 10.0  # MANY_LOW_CONFIDENCE when review cells % of all cells > this
    review_threshold: float | None = None  # None: the model's own default from its metadata
    review_max_images: int = 2000  # thumbnails embedded in the Review sheet; the rest are listed only
    reference_ranges: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: DEFAULT_REFERENCE_RANGES, hash=False
    )

    def reference_range(self, class_id: str) -> tuple[float, float] | None:
        return self.reference_ranges.get(class_id)

    def describe(self) -> list[tuple[str, str]]:
        """Rows for the Run sheet, so a report always says which thresholds produced its flags."""
        rt = "model default" if self.review_threshold is None else _num(self.review_threshold)
        rows = [
            ("Flag BLASTS_PRESENT: blasts >= (cells) [flags.blasts_present_min_count]", str(self.blasts_present_min_count)),
            ("Flag BLASTS_HIGH: blasts >= (% of WBC) [flags.blasts_high_pct]", _num(self.blasts_high_pct)),
            ("Flag IG_HIGH: immature granulocytes > (% of WBC) [flags.ig_high_pct]", _num(self.ig_high_pct)),
            ("Flag BANDS_HIGH: band neutrophils > (% of WBC) [flags.bands_high_pct]", _num(self.bands_high_pct)),
            ("Flag NRBC_PRESENT: erythroblasts >= (cells) [flags.nrbc_present_min_count]", str(self.nrbc_present_min_count)),
            ("Flag LOW_WBC: WBC classified < [flags.min_wbc]", str(self.min_wbc)),
            (
                "Flag MANY_LOW_CONFIDENCE: review cells > (% of cells) [flags.low_confidence_high_pct]",
                _num(self.low_confidence_high_pct),
            ),
            ("Review threshold from config [review.threshold]", rt),
            ("Review thumbnails embedded at most [review.max_images]", str(self.review_max_images)),
        ]
        for cid in catalogue.WBC_CLASS_IDS:
            rng = self.reference_range(cid)
            text = "none" if rng is None else f"{_num(rng[0])}-{_num(rng[1])} %"
            rows.append((f"Reference range {catalogue.get(cid).display} [reference_ranges.{cid}]", text))
        return rows


def _num(x: float) -> str:
    return f"{x:g}"


DEFAULT_SETTINGS = Settings()


# ---------------------------------------------------------------- loading

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _percent(v: Any) -> float | None:
    return float(v) if _is_number(v) and 0.0 <= v <= 100.0 else None


def _count(minimum: int) -> Callable[[Any], int | None]:
    def check(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= minimum else None

    return check


def _probability(v: Any) -> float | None:
    return float(v) if _is_number(v) and 0.0 < v < 1.0 else None


# table -> key -> (Settings field, validator, what a valid value is)
_SCHEMA: dict[str, dict[str, tuple[str, Callable[[Any], Any], str]]] = {
    "flags": {
        "blasts_present_min_count": ("blasts_present_min_count", _count(1), "a whole number >= 1"),
        "blasts_high_pct": ("blasts_high_pct", _percent, "a number from 0 to 100"),
        "ig_high_pct": ("ig_high_pct", _percent, "a number from 0 to 100"),
        "bands_high_pct": ("bands_high_pct", _percent, "a number from 0 to 100"),
        "nrbc_present_min_count": ("nrbc_present_min_count", _count(1), "a whole number >= 1"),
        "min_wbc": ("min_wbc", _count(0), "a whole number >= 0"),
        "low_confidence_high_pct": ("low_confidence_high_pct", _percent, "a number from 0 to 100"),
    },
    "review": {
        "threshold": ("review_threshold", _probability, "a probability between 0 and 1 (exclusive)"),
        "max_images": ("review_max_images", _count(0), "a whole number >= 0"),
    },
}


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_ranges(name: str, table: Any) -> Mapping[str, tuple[float, float]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: [reference_ranges] must be a table of class = [low, high].")
    ranges = dict(DEFAULT_REFERENCE_RANGES)
    for cid, value in table.items():
        if cid not in catalogue.WBC_CLASS_IDS:
            raise ConfigError(
                f"{name}: unknown key reference_ranges.{cid}; reference ranges apply to the leukocyte classes "
                f"{', '.join(catalogue.WBC_CLASS_IDS)}."
            )
        if isinstance(value, list) and not value:
            ranges.pop(cid, None)  # [] = show no reference range for this class
            continue
        ok = isinstance(value, list) and len(value) == 2 and all(_percent(v) is not None for v in value)
        if not ok or value[0] > value[1]:
            raise ConfigError(
                f"{name}: reference_ranges.{cid} must be [low, high] percentages with low <= high "
                f"(or [] for none), not {_shown(value)}."
            )
        ranges[cid] = (float(value[0]), float(value[1]))
    return _ranges(ranges)


def settings_from_dict(data: Mapping[str, Any], name: str = "config") -> Settings:
    """Validate a parsed TOML document against the schema; partial documents override defaults."""
    changes: dict[str, Any] = {}
    for table_name, table in data.items():
        if table_name == "reference_ranges":
            changes["reference_ranges"] = _parse_ranges(name, table)
            continue
        schema = _SCHEMA.get(table_name)
        if schema is None:
            known = ", ".join(f"[{t}]" for t in (*_SCHEMA, "reference_ranges"))
            raise ConfigError(f"{name}: unknown section or key {table_name!r} (known sections: {known}).")
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: {table_name} must be a [{table_name}] table.")
        for key, value in table.items():
            if key not in schema:
                raise ConfigError(
                    f"{name}: unknown key {table_name}.{key} (known: {', '.join(schema)})."
                )
            attr, check, expected = schema[key]
            parsed = check(value)
            if parsed is None:
                raise ConfigError(f"{name}: {table_name}.{key} must be {expected}, not {_shown(value)}.")
            changes[attr] = parsed
    return replace(DEFAULT_SETTINGS, **changes)


def load_settings(path: str | Path | None) -> Settings:
    """Read a TOML config; None gives the defaults. Raises ConfigError with one sentence."""
    if path is None:
        return DEFAULT_SETTINGS
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    p = Path(path)
    name = p.name or str(p)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist or is not a file.")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror or exc}).") from None
    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {name} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {name} is not valid TOML: {exc}.") from None
    return settings_from_dict(data, name)


__all__ = [
    "ConfigError",
    "Settings",
    "DEFAULT_SETTINGS",
    "DEFAULT_REFERENCE_RANGES",
    "load_settings",
    "settings_from_dict",
]

