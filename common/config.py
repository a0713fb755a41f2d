"""Config loading: ``conf/base.yaml`` ⊕ ``conf/<pipeline>.yaml`` ⊕ preset ⊕ command-line overrides.

A pipeline file may also define ``presets`` (named bundles of values) and ``shortcuts`` (bare
command-line keys standing for dotted ones). The merged base and pipeline files are the schema: a preset or an override may only set keys that
exist there, with a value of the type the default has. Anything else is a :class:`ConfigError`
whose message is one line saying what to fix.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def lightyard_home() -> str:
    """Where stores, outputs and caches live: ``$LIGHTYARD_HOME``, else ``~/.lightyard`` (never the current folder,
    so runs started from different places share one store and one cache)."""
    home = os.environ.get("LIGHTYARD_HOME")  # a relative one is made absolute (the runs record where they live)
    return str(Path(home).expanduser().absolute()) if home else str(Path.home() / ".lightyard")


OmegaConf.register_resolver("lightyard_home", lightyard_home, replace=True)


class ConfigError(ValueError):
    """A mistake the user can fix in the config or on the command line (printed as one line)."""


def _type_name(value: Any) -> str:
    if isinstance(value, (dict, DictConfig)):
        return "mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    return type(value).__name__


def _checked_value(key: str, default: Any, value: Any) -> Any:
    """Return ``value`` if it fits the type of ``default``; raise ConfigError otherwise."""
    if (isinstance(value, str) and value == "") or (value is None and default is not None):  # `key=`: never a default
        kind = f"{_type_name(default)}, default {default!r}" if default is not None else "default null"
        raise ConfigError(f"config key '{key}' needs a value ({kind}); got an empty one")
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        # an int where a float is expected is fine (lr=1 is 1.0); it keeps its type for Lightning's
        # int-or-fraction arguments such as limit_train_batches
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            ok, value = True, float(value.replace(".", ""))  # YAML reads nan/inf as strings; the range check below refuses them
        if ok and not math.isfinite(value):  # no setting takes nan or inf; lr=inf would train to nan silently
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    elif isinstance(default, str):
        if isinstance(value, (int, float, bool)):  # precision=32 parses as an int
            value = str(value)
        ok = isinstance(value, str)
    elif isinstance(default, (list, ListConfig)):
        ok = isinstance(value, (list, ListConfig))
    elif isinstance(default, (dict, DictConfig)):
        ok = isinstance(value, (dict, DictConfig))
    else:
        ok = True
    if not ok:
        raise ConfigError(f"config key '{key}' expects {_type_name(default)}, got {value!r} ({_type_name(value)})")
    return value


def _unknown_key(path: str, key: str, node: DictConfig) -> ConfigError:
    where = f"'{path}'" if path else "the top level"
    valid = ", ".join(sorted(str(k) for k in node.keys())) or "(none)"
    full = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key '{full}'; valid keys at {where}: {valid}")


def merge_checked(schema: DictConfig, update: dict | DictConfig, path: str = "") -> None:
    """Merge ``update`` into ``schema`` in place, refusing unknown keys and wrong types."""
    for key, value in update.items():
        if key not in schema:
            raise _unknown_key(path, key, schema)
        full = f"{path}.{key}" if path else str(key)
        node = schema._get_node(key)
        if isinstance(node, DictConfig) and isinstance(value, (dict, DictConfig)):
            if value:
                merge_checked(node, value, full)
                continue
            if not path and len(node):  # model={}: a top-level section's keys are read by the code
                raise ConfigError(f"'{full}' is a section: set its keys ({full}.{next(iter(node))}=…), not the whole of it to {{}}")
            # a nested {} replaces the mapping (model.kwargs={}: the constructor's defaults), below
        if OmegaConf.is_interpolation(schema, key):
            default = None  # the type of an interpolated default is whatever it points at
        else:
            default = node if isinstance(node, (DictConfig, ListConfig)) else node._value()
        schema[key] = _checked_value(full, default, value)


def set_checked(cfg: DictConfig, dotted_key: str, value: Any) -> None:
    """``cfg.a.b.c = value`` with the same checks as :func:`merge_checked`."""
    *parents, leaf = dotted_key.split(".")
    node, path = cfg, ""
    for part in parents:
        full = f"{path}.{part}" if path else part
        if part in node and isinstance(node[part], ListConfig):  # a.list.0=…
            raise ConfigError(f"'{full}' is a list; set it whole ({full}=[…])")
        if part not in node or not isinstance(node[part], DictConfig):
            raise _unknown_key(path, part, node)
        node, path = node[part], full
    base = leaf.partition("[")[0]
    if base != leaf and base in node and isinstance(node[base], ListConfig):  # a.list[0]=…
        full = f"{path}.{base}" if path else base
        raise ConfigError(f"'{full}' is a list; set it whole ({full}=[…])")
    merge_checked(node, {leaf: value}, path)


def with_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set, checked like command-line overrides (for experiment grids)."""
    out = cfg.copy()
    for key, value in values.items():
        set_checked(out, key, value)
    return out


def parse_value(text: str) -> Any:
    """Parse one override value with OmegaConf's grammar (``1e-3`` is a float, ``[1,2]`` a list)."""
    import yaml

    if not text.strip():
        return ""  # `key=`: refused by the key's check, which knows its type and default
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # yaml's own: an unclosed [ { or quote, a stray @ or `
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"cannot parse value {text!r}: {problem} (close brackets and quotes; quote a value with : @ or `)") from None
    _check_mapping_keys(value, text)
    return value


def _check_mapping_keys(value: Any, text: str) -> None:
    """YAML reads ``{a:1}`` as the key ``'a:1'`` with no value: say so instead of passing it on."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key:
                name, _, rest = key.partition(":")
                raise ConfigError(f"in {text!r}, '{key}' reads as one key with no value; write '{name}: {rest}' (a space after the colon)")
            _check_mapping_keys(item, text)
    elif isinstance(value, list):
        for item in value:
            _check_mapping_keys(item, text)


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


TEXT_KEYS = {"resume"}  # a run id (or its prefix) or a path: the grammar would read the prefix 012345 as octal 5349


def parse_overrides(overrides: list[str]) -> list[tuple[str, list[Any]]]:
    """``["a.b=1", "c=x,y"]`` → ``[("a.b", [1]), ("c", ["x", "y"])]``; a comma list is a sweep axis."""
    parsed: dict[str, list[Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (for example trainer.max_epochs=3)")
        if key in parsed:  # the last would win silently (and repeat a sweep's runs)
            raise ConfigError(f"config key '{key}' is given twice; give it once (a sweep: {key}=a,b)")
        parts = _split_top_level_commas(raw)
        parsed[key] = [parse_value(part) for part in parts]
        if key in TEXT_KEYS:  # as typed (null and empty aside)
            parsed[key] = [v if v is None or v == "" else part.strip() for v, part in zip(parsed[key], parts)]
        repeated = sorted({str(v) for v in parsed[key] if sum(str(w) == str(v) for w in parsed[key]) > 1})
        if repeated:  # each would run again, the same point
            raise ConfigError(f"{key}={raw} repeats {', '.join(repeated)}; give each value once")
    return list(parsed.items())


def sweep_points(overrides: list[str]) -> list[dict[str, Any]]:
    """The grid spanned by the overrides: one dict ``{key: value}`` per point (one point if no sweep)."""
    axes = parse_overrides(overrides)
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


_RANGE = re.compile(r"^\s*([\[(])\s*(-?inf|[-+0-9.eE]+)\s*,\s*(-?inf|[-+0-9.eE]+)\s*([\])])\s*$")
_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def _rule_holds(rule: str, value: Any) -> bool:
    """``> 0``, ``>= 1``, ``[0, 1)``, ``(0, inf)``, ``one of a|b|c``, ``integer`` against one value."""
    if rule == "integer":  # sizes and counts inside a list (a list's element types are not checked otherwise)
        return isinstance(value, int) and not isinstance(value, bool)
    if rule.startswith("one of "):
        return str(value) in [v.strip() for v in rule[len("one of ") :].split("|")]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if match := _BOUND.match(rule):
        op, bound = match.group(1), float(match.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    if match := _RANGE.match(rule):
        lo, hi = float(match.group(2)), float(match.group(3))
        return (value >= lo if match.group(1) == "[" else value > lo) and (value <= hi if match.group(4) == "]" else value < hi)
    raise ConfigError(f"bad rule {rule!r} in the config's checks: use '> 0', '>= 1', '[0, 1)', 'one of a|b' or 'integer'")


def _list_rule_holds(rule: str, value: Any) -> bool | None:
    """``non-empty`` and ``length N`` judge a list as a whole (None: not a list rule)."""
    if rule == "non-empty":
        return isinstance(value, (list, ListConfig)) and len(value) > 0
    if rule.startswith("length "):  # "length 3", or "length 1|3" (one value for every channel, or one each)
        return isinstance(value, (list, ListConfig)) and len(value) in {int(n) for n in rule[len("length ") :].split("|")}
    return None


SEED_RULE = "integer; [0, 4294967295]"  # numpy's seed range


def check_ranges(cfg: DictConfig, checks: dict[str, str]) -> None:
    """Every ``checks`` rule (dotted key → rule) against the composed config; a list is checked element by element
    (``non-empty`` and ``length N`` judge the list itself; rules joined by ``;`` all apply); a null value (an
    optional key left unset) passes."""
    for key, rules in checks.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        element_rules = []
        for rule in (r.strip() for r in str(rules).split(";")):
            holds = _list_rule_holds(rule, value)
            if holds is None:
                element_rules.append(rule)
            elif not holds:
                shown = list(value) if isinstance(value, (list, ListConfig)) else repr(value)
                lengths = rule[len("length ") :].replace("|", " or ")
                raise ConfigError(
                    f"config key '{key}' must be a {'non-empty list' if rule == 'non-empty' else f'list of {lengths} values'}, got {shown}"
                )
        for rule in element_rules:
            _check_elements(key, rule, value)


def _check_elements(key: str, rule: str, value: Any) -> None:
    values = list(value) if isinstance(value, (list, ListConfig)) else [value]
    for item in values:
        if item is not None and not _rule_holds(rule, item):
            shown = f"{item!r} (in {list(value)})" if isinstance(value, (list, ListConfig)) else repr(item)
            wording = f"in {rule}" if rule[:1] in "[(" else "an integer" if rule == "integer" else rule
            raise ConfigError(f"config key '{key}' must be {wording}, got {shown}")


def _load_yaml(path: Path) -> DictConfig:
    """The file's config, a copy the caller may change: parsed once per content (a grid composes every point from the
    same files; a copy takes half the time of OmegaConf building the file again)."""
    return copy.deepcopy(_shared_yaml(path))


def _shared_yaml(path: Path) -> DictConfig:
    """The file's config as parsed, shared by every caller: read it, never change it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}): save the config as UTF-8") from None
    return _parsed_yaml(str(path), text)


@functools.lru_cache(maxsize=64)
def _parsed_yaml(path: str, text: str) -> DictConfig:
    import yaml

    try:
        return OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        where = str(err).replace('"<unicode string>", ', "")  # (parsed from text: the path is ours to give)
        raise ConfigError(f"{path}: {' '.join(where.split())}") from None


# `fabric run` (Lightning's launcher) starts one process per device under torchrun and passes its options as LT_*
# variables: they set the trainer over the preset, and the command line's own overrides still win
FABRIC_RUN = {
    "LT_ACCELERATOR": "trainer.accelerator",
    "LT_STRATEGY": "trainer.strategy",
    "LT_DEVICES": "trainer.devices",
    "LT_NUM_NODES": "trainer.num_nodes",
    "LT_PRECISION": "trainer.precision",
}


def fabric_run_values() -> dict[str, Any]:
    if not os.environ.get("LT_CLI_USED"):
        return {}
    values = {key: os.environ[var] for var, key in FABRIC_RUN.items() if os.environ.get(var)}
    return {k: int(v) if k == "trainer.num_nodes" else v for k, v in values.items()}


def _yaml_text(value: Any) -> str:
    if isinstance(value, (list, ListConfig)):
        return f"[{', '.join(map(_yaml_text, value))}]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_applies(
    pipeline: str, configs: list[DictConfig], values: dict[str, Any], path: str | Path | None = None, command: str | None = None
) -> None:
    """A key given on the command line where it has no effect: the pipeline file's ``applies`` table names, per key
    (or ``prefix.``), the settings it needs (``{loss.tau: {loss.name: [bal_ce, bal_bce]}}``). Refused when no run of
    the command (a sweep's points, a grid's children) meets them; it used to be ignored without a word. The bench and
    reproduce sections are their grids' settings: given to ``train`` they are refused too."""
    pipeline_cfg = pipeline_file(pipeline, path)
    applies = pipeline_cfg.get("applies") or {}
    shortcuts = pipeline_cfg.get("shortcuts") or {}
    for given in values:
        key = shortcuts.get(given, given)
        section = key.split(".")[0]
        if command == "train" and section in ("bench", "reproduce"):
            named = key if key == given else f"{given} ({key})"
            # `root=` on train most likely meant the training data's folder
            meant = f" (a train run reads data.{given}=<…>)" if given in (configs[0].get("data") or {}) else ""
            raise ConfigError(f"{named} has no effect on `lightyard train`: `lightyard {section} {pipeline}` reads it; leave it out{meant}")
        for rule, needs in applies.items():
            # the key itself, a key under a prefix rule (``lowrank.``), or a whole section given at once (``lowrank={…}``)
            given_keys = {key} if not isinstance(values[given], (dict, DictConfig)) else {f"{key}.{k}" for k in values[given]}
            if not (key == rule or (rule.endswith(".") and key.startswith(rule)) or rule.startswith(key + ".")) or given_keys <= set(needs):
                continue  # (a setting the rule depends on always applies: mgp.enabled under mgp., or mgp={enabled: false})
            if not any(all(_applies(OmegaConf.select(c, k), allowed) for k, allowed in needs.items()) for c in configs):
                listed = {
                    k for k, allowed in needs.items() if isinstance(OmegaConf.select(configs[0], k), ListConfig) and None not in allowed
                }
                verb = {k: "includes" if k in listed else "is" for k in needs}
                wanted = " and ".join(f"{k} {verb[k]} {'/'.join(map(_yaml_text, allowed))}" for k, allowed in needs.items())
                here = ", ".join(f"{k}={_yaml_text(OmegaConf.select(configs[0], k))}" for k in needs)
                raise ConfigError(f"{key} has no effect here: it applies when {wanted} ({here}); leave it out")


def _applies(value: Any, allowed: list) -> bool:
    """A setting's value among the allowed ones; a list setting (``sim.schemes``) when one of its entries is."""
    return any(v in allowed for v in value) if isinstance(value, ListConfig) else value in allowed


def pipeline_file(pipeline: str, path: str | Path | None = None) -> DictConfig:
    """The pipeline's config file as written (interpolations unresolved), shared: read it, never change it."""
    return _shared_yaml(Path(path) if path else CONF_DIR / f"{pipeline}.yaml")


def shortcut_for(pipeline: str, key: str, path: str | Path | None = None) -> str:
    """The bare command-line name that stands for ``key`` in the pipeline's ``shortcuts`` (``root`` for
    ``reproduce.root``), else the key itself."""
    shortcuts = pipeline_file(pipeline, path).get("shortcuts") or {}
    return next((short for short, full in shortcuts.items() if full == key), key)


def load_config(pipeline: str, values: dict[str, Any] | None = None, path: str | Path | None = None) -> DictConfig:
    """Compose the resolved config of ``pipeline`` with override ``values`` (``{dotted key: value}``)."""
    values = dict(values or {})
    path = Path(path) if path else CONF_DIR / f"{pipeline}.yaml"
    if not path.exists():
        raise ConfigError(f"no config for pipeline '{pipeline}': expected {path}")
    cfg = _load_yaml(CONF_DIR / "base.yaml")
    pipeline_cfg = _load_yaml(path)
    checks = {**(cfg.pop("checks", None) or {}), **(pipeline_cfg.pop("checks", None) or {})}
    presets = pipeline_cfg.pop("presets", None) or OmegaConf.create({})
    # bare command-line keys that stand for dotted ones (``root=...`` for ``reproduce.root=...``)
    shortcuts = pipeline_cfg.pop("shortcuts", None) or {}
    pipeline_cfg.pop("applies", None)  # (read by check_applies, over all the runs of a command)
    values = {shortcuts.get(key, key): value for key, value in values.items()}
    cfg = OmegaConf.merge(cfg, pipeline_cfg)
    cfg.pipeline = pipeline

    preset = values.pop("preset", cfg.get("preset"))
    if preset in ("", None):
        raise ConfigError(f"preset needs a value: one of {', '.join(presets.keys())}")
    if preset not in presets:
        raise ConfigError(f"unknown preset '{preset}' for {pipeline}; valid presets: {', '.join(presets.keys()) or '(none)'}")
    # keys whose default is null take null again on the command line, also where the preset set them
    nullable = {k for k, v in flatten(OmegaConf.to_container(cfg, resolve=False)).items() if v is None}
    merge_checked(cfg, presets[preset])
    cfg.preset = preset
    for key, value in {**fabric_run_values(), **values}.items():
        if value is None and key in nullable:
            OmegaConf.update(cfg, key, None, merge=False)
        else:
            set_checked(cfg, key, value)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config does not resolve: {str(err).splitlines()[0]}") from None
    # every key named seed or seeds is a numpy seed unless the checks say otherwise (experiments' grids take theirs
    # from keys checked here: reproduce.seeds)
    seeds = {k: SEED_RULE for k in flatten(cfg) if k.rsplit(".", 1)[-1] in ("seed", "seeds") and not k.startswith("experiments.")}
    check_ranges(cfg, {**seeds, **checks})
    dataset = OmegaConf.select(cfg, "logger.dataset", default=None)
    if dataset and not isinstance(OmegaConf.select(cfg, str(dataset), default=None), DictConfig):
        sections = ", ".join(k for k, v in cfg.items() if isinstance(v, DictConfig) and k not in ("checks", "experiments"))
        raise ConfigError(f"logger.dataset={dataset} names no config section (it would log no dataset); give one of {sections}, or null")
    if "trainer" in cfg:
        from common.hardware import check_trainer

        check_trainer(cfg.trainer)
    OmegaConf.set_struct(cfg, True)  # later typos in code fail loudly too
    return cfg


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat
