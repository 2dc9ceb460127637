"""Lab-configurable thresholds: flag cut-offs, review options and reference ranges.

Every number that turns a count into a flag lives here, with a default a haematology lab
would recognise (sources in docs/report.md), so a lab can adapt them with one TOML file
(`--config FILE`) instead of editing code. Unknown keys and wrong types are errors, never
silently ignored: a typo in a safety threshold must not fall back to a default unnoticed.
The flag thresholds, their defaults and their config keys come from one table,
flags.FLAG_RULES; this module adds the review options and reference ranges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Sequence

from batchwbc.core import catalogue
from batchwbc.core.flags import FLAG_RULES, PERCENT, FlagRule


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


class _SettingsMethods:
    """Behaviour of Settings; its fields are generated from the flag-rule table below."""

    flag_rules: ClassVar[tuple[FlagRule, ...]] = FLAG_RULES
    reference_ranges: Mapping[str, tuple[float, float]]
    review_threshold: float | None
    review_max_images: int

    def reference_range(self, class_id: str) -> tuple[float, float] | None:
        return self.reference_ranges.get(class_id)

    def describe(self) -> list[tuple[str, str]]:
        """Rows for the Run sheet, so a report always says which thresholds produced its flags."""
        rt = "model default" if self.review_threshold is None else _num(self.review_threshold)
        rows = [rule.describe(getattr(self, rule.setting)) for rule in self.flag_rules]
        rows += [
            ("Review threshold from config [review.threshold]", rt),
            ("Review thumbnails embedded at most [review.max_images]", str(self.review_max_images)),
        ]
        for cid in catalogue.WBC_CLASS_IDS:
            rng = self.reference_range(cid)
            text = "none" if rng is None else f"{_num(rng[0])}-{_num(rng[1])} %"
            rows.append((f"Reference range {catalogue.get(cid).display} [reference_ranges.{cid}]", text))
        return rows

# ---------------------------------------------------------------- [lis]: messages to the LIS (issue 21)
# Which code each reported result carries, and the HL7 header fields a lab's LIS or middleware
# expects. Defaults and the source of every LOINC code: docs/lis.md. A lab with local or
# methodless codes replaces rows of [lis.codes]; every key is validated when the config is read.

@dataclass(frozen=True)
class ResultCode:
    """One coded result: HL7 coding-system id (LN = LOINC, 99xxx = local) and its FHIR system URI."""

    code: str
    display: str
    system: str = "LN"
    uri: str = "http://loinc.org"


#: What each code key reports: the ten leukocyte classes (% of WBC), then the extra results.
LIS_EXTRA_KEYS = ("nrbc_per_100_wbc", "smudge", "unclassified", "panel")
_LOCAL = dict(system="99BWBC", uri="urn:batchwbc:local-codes")
DEFAULT_LIS_CODES: Mapping[str, ResultCode] = MappingProxyType({
    # display = LOINC's long common name as found in public copies of the LOINC table (docs/lis.md);
    # 783-1 and 18309-5 were not found in one: to confirm on loinc.org before go-live.
    "neutrophil_segmented": ResultCode("769-0", "Neutrophils.segmented/100 leukocytes in Blood by Manual count"),
    "neutrophil_band": ResultCode("764-1", "Neutrophils.band form/100 leukocytes in Blood by Manual count"),
    "lymphocyte": ResultCode("737-7", "Lymphocytes/100 leukocytes in Blood by Manual count"),
    "monocyte": ResultCode("744-3", "Monocytes/100 leukocytes in Blood by Manual count"),
    "eosinophil": ResultCode("714-6", "Eosinophils/100 leukocytes in Blood by Manual count"),
    "basophil": ResultCode("707-0", "Basophils/100 leukocytes in Blood by Manual count"),
    "myeloblast": ResultCode("709-6", "Blasts/100 leukocytes in Blood by Manual count"),
    "promyelocyte": ResultCode("783-1", "Promyelocytes/100 leukocytes in Blood by Manual count"),
    "myelocyte": ResultCode("749-2", "Myelocytes/100 leukocytes in Blood by Manual count"),
    "metamyelocyte": ResultCode("740-1", "Metamyelocytes/100 leukocytes in Blood by Manual count"),
    "nrbc_per_100_wbc": ResultCode("18309-5", "Nucleated erythrocytes/100 leukocytes [Ratio] in Blood by Manual count"),
    # No LOINC term counts what batchwbc counts here (crops, outside the WBC denominator): local codes.
    "smudge": ResultCode("SMUDGE", "Smudge cells counted (not in WBC)", **_LOCAL),
    "unclassified": ResultCode("UNCLASSIFIED", "Crops not recognised as a known cell (not counted)", **_LOCAL),
    "panel": ResultCode("24318-8", "Manual Differential panel - Blood"),
})
#: HL7 fields that may carry the patient/slide folder's name (ORC mirrors OBR's order numbers).
LIS_IDENTIFIER_FIELDS = ("PID-3", "OBR-2", "OBR-3")


@dataclass(frozen=True)
class LisSettings:
    """The [lis] table: codes and the HL7 header fields; defaults in docs/config-example.toml."""

    identifier_field: str = "PID-3"  # where the folder name goes; PID-3 always holds it when chosen
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging
    ack_timeout_s: float = 10.0  # --mllp: seconds to wait for a connection and for each ACK
    # `batchwbc run --hl7/--mllp` sends every patient's pre-classification as a preliminary
    # result (status P) only when a lab sets this: a pre-classification is not a result, so
    # sending one is the lab's decision, taken once in its config, not a command-line habit.
    send_preliminary: bool = False
    codes: Mapping[str, ResultCode] = field(default_factory=lambda: DEFAULT_LIS_CODES)

    def code(self, key: str) -> ResultCode:
        return self.codes[key]


DEFAULT_LIS = LisSettings()


def _lis_text(name: str, key: str, value: Any, allowed: Sequence[str] | None = None, empty: bool = True) -> str:
    ok = isinstance(value, str) and (empty or value.strip()) and not any(c in value for c in "\r\n|^~\\&")
    if not ok or (allowed is not None and value not in allowed):
        want = f"one of {', '.join(allowed)}" if allowed else "text without line breaks or the HL7 delimiters |^~\\&"
        raise ConfigError(f"{name}: lis.{key} must be {want}, not {_shown(value)}.")
    return value


def _parse_code(name: str, key: str, table: Any) -> ResultCode:
    where = f"lis.codes.{key}"
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: {where} must be a table with code, display and system (and uri unless system is LN).")
    unknown = set(table) - {"code", "display", "system", "uri"}
    if unknown:
        raise ConfigError(f"{name}: unknown key {where}.{sorted(unknown)[0]} (known: code, display, system, uri).")
    values = {k: _lis_text(name, f"codes.{key}.{k}", table.get(k, ""), empty=k == "uri")
              for k in ("code", "display", "system", "uri")}
    if values["system"] == "LN":
        values["uri"] = values["uri"] or "http://loinc.org"
    elif not values["uri"]:
        raise ConfigError(f"{name}: {where}.uri is needed for the FHIR system of a non-LOINC code (system {values['system']!r}).")
    return ResultCode(**values)


def parse_lis(name: str, table: Any) -> LisSettings:
    """Validate the [lis] table; a partial [lis.codes] replaces only the rows it names."""
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: lis must be a [lis] table.")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key == "codes":
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: lis.codes must be a table of [lis.codes.<key>] tables.")
            codes = dict(DEFAULT_LIS_CODES)
            for ckey, ctable in value.items():
                if ckey not in codes:
                    raise ConfigError(f"{name}: unknown key lis.codes.{ckey} (known: {', '.join(codes)}).")
                codes[ckey] = _parse_code(name, ckey, ctable)
            changes["codes"] = MappingProxyType(codes)
        elif key == "identifier_field":
            changes[key] = _lis_text(name, key, value, LIS_IDENTIFIER_FIELDS)
        elif key == "processing_id":
            changes[key] = _lis_text(name, key, value, ("P", "T", "D"))
        elif key in ("sending_facility", "receiving_application", "receiving_facility"):
            changes[key] = _lis_text(name, key, value)
        elif key == "ack_timeout_s":
            if not (_is_number(value) and 0 < value <= 600):
                raise ConfigError(f"{name}: lis.ack_timeout_s must be a number of seconds above 0 and at most 600, "
                                  f"not {_shown(value)}.")
            changes[key] = float(value)
        elif key == "send_preliminary":
            if not isinstance(value, bool):
                raise ConfigError(f"{name}: lis.send_preliminary must be true or false, not {_shown(value)}.")
            changes[key] = value
        else:
            known = "identifier_field, sending_facility, receiving_application, receiving_facility, processing_id, " \
                    "ack_timeout_s, send_preliminary, codes"
            raise ConfigError(f"{name}: unknown key lis.{key} (known: {known}).")
    return replace(DEFAULT_LIS, **changes)
# ---------------------------------------------------------------- end of [lis]


def make_settings_class(rules: Sequence[FlagRule], name: str = "Settings") -> type:
    """A frozen Settings dataclass: one field per flag rule (its threshold, with the rule's
    default), then the review options and the reference ranges. Public so a test can show
    that a new rule becomes a setting, a config key and a documented row by itself."""
    fields: list[tuple[str, Any, Any]] = [
        (r.setting, float if r.unit == PERCENT else int, field(default=r.default)) for r in rules
    ]
    fields += [
        ("review_threshold", "float | None", field(default=None)),  # None: the model's own default
        ("review_max_images", int, field(default=2000)),  # thumbnails embedded in Review; the rest are listed
        ("reference_ranges", "Mapping[str, tuple[float, float]]",
         field(default_factory=lambda: DEFAULT_REFERENCE_RANGES, hash=False)),
        ("lis", "LisSettings", field(default_factory=lambda: DEFAULT_LIS, hash=False)),  # [lis], issue 21
        # the settings a config file (or a report's Run sheet) gave, so a model default never overrides them
        ("set_by_config", "frozenset[str]", field(default=frozenset(), compare=False)),
    ]
    cls = make_dataclass(name, fields, bases=(_SettingsMethods,), frozen=True,
                         namespace={"flag_rules": tuple(rules), "__module__": __name__})
    cls.__doc__ = ("Thresholds for flags and review; each flag threshold's comparison is part of its rule "
                   "(flags.FLAG_RULES).")
    return cls


#: Thresholds for flags and review (the fields follow flags.FLAG_RULES).
Settings = make_settings_class(FLAG_RULES)


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


Schema = dict[str, dict[str, tuple[str, Callable[[Any], Any], str]]]


def make_schema(rules: Sequence[FlagRule]) -> Schema:
    """table -> key -> (Settings field, validator, what a valid value is); [flags] is the rule table."""
    return {
        "flags": {r.setting: (r.setting, r.parse, r.expected) for r in rules},
        "review": {
            "threshold": ("review_threshold", _probability, "a probability between 0 and 1 (exclusive)"),
            "max_images": ("review_max_images", _count(0), "a whole number >= 0"),
        },
    }


_SCHEMA: Schema = make_schema(FLAG_RULES)


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
        if table_name == "lis":
            changes["lis"] = parse_lis(name, table)
            continue
        schema = _SCHEMA.get(table_name)
        if schema is None:
            known = ", ".join(f"[{t}]" for t in (*_SCHEMA, "reference_ranges", "lis"))
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
    return replace(DEFAULT_SETTINGS, **changes, set_by_config=frozenset(changes))


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """The settings as the TOML document that makes them (settings_from_dict's inverse).

    Why: a report records the thresholds it was made with in a machine-readable form
    (batchwbc.outputs.run_record), so `batchwbc verify` rebuilds them through the same
    validation as a config file instead of parsing the Run sheet's display text.
    A review threshold of None (the model's own default) is left out, as a config would."""
    review: dict[str, Any] = {"max_images": settings.review_max_images}
    if settings.review_threshold is not None:
        review["threshold"] = settings.review_threshold
    ranges: dict[str, list[float]] = {}
    for cid in catalogue.WBC_CLASS_IDS:
        rng = settings.reference_range(cid)
        ranges[cid] = [] if rng is None else [rng[0], rng[1]]
    lis = settings.lis
    return {
        "flags": {r.setting: getattr(settings, r.setting) for r in settings.flag_rules},
        "review": review,
        "reference_ranges": ranges,
        "lis": {
            "identifier_field": lis.identifier_field, "sending_facility": lis.sending_facility,
            "receiving_application": lis.receiving_application, "receiving_facility": lis.receiving_facility,
            "processing_id": lis.processing_id, "ack_timeout_s": lis.ack_timeout_s,
            "codes": {key: {"code": c.code, "display": c.display, "system": c.system, "uri": c.uri}
                      for key, c in lis.codes.items()},
        },
    }


#: The flag threshold a model's own validation data sets unless the config gives one.
MODEL_REVIEW_SHARE_SETTING = "low_confidence_high_pct"


def with_model_defaults(settings: Settings, review_share_pct: float | None) -> Settings:
    """MANY_LOW_CONFIDENCE's threshold is the share of cells the model itself sends to review
    on its validation data (model metadata), unless the config sets it. Why: a model whose
    review threshold sends 35 % of validation cells to review would otherwise flag every
    patient against a fixed 20 %, and a very confident model would hide a bad slide."""
    if review_share_pct is None or MODEL_REVIEW_SHARE_SETTING in settings.set_by_config:
        return settings
    return replace(settings, **{MODEL_REVIEW_SHARE_SETTING: round(float(review_share_pct), 1)})


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
    "settings_as_dict",
    "settings_from_dict",
]

