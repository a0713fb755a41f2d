import re

import pytest

from common.config import CONF_DIR, ConfigError, parse_overrides, sweep_points, with_values
from common.runner import compose
from tests.conftest import cli


def test_base_pipeline_preset_and_override_merge():
    cfg = compose("toy", {"model.lr": 0.5, "trainer.max_epochs": 7})
    assert cfg.model.lr == 0.5
    assert cfg.trainer.max_epochs == 7  # override beats the quick preset's 2
    assert cfg.trainer.accelerator == "cpu"  # from the quick preset
    assert cfg.seed == 0  # from base.yaml
    assert compose("toy", {"preset": "paper"}).trainer.max_epochs == 20


def test_unknown_key_names_the_valid_keys_at_that_level():
    with pytest.raises(ConfigError) as err:
        compose("toy", {"model.lrr": 0.1})
    message = str(err.value)
    assert "model.lrr" in message and "hidden, lr, momentum, optimizer" in message
    assert "\n" not in message


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"trainer.max_epochs' expects int, got 'three' \(str\)"):
        compose("toy", {"trainer.max_epochs": "three"})
    with pytest.raises(ConfigError, match="expects bool"):
        compose("toy", {"data.shuffle": 3})
    assert compose("toy", {"model.lr": 1}).model.lr == 1  # int is fine where a float is expected


def test_a_key_whose_default_is_null_takes_null_back_over_its_preset():
    # input_iba's smoke preset sets data.train_size=64; its documented default null ("all but the estimation images")
    # was refused as an empty value
    assert compose("input_iba", {"preset": "smoke", "data.train_size": None}).data.train_size is None
    with pytest.raises(ConfigError, match=r"config key 'data.image_size' needs a value \(int, default 16\); got an empty one"):
        compose("input_iba", {"preset": "smoke", "data.image_size": None})  # never null: still refused


def test_the_integer_rule_judges_each_element_of_a_list():
    from common.config import check_ranges
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"size": [32.5, 48], "ok": [32, 48]})
    check_ranges(cfg, {"ok": "length 2; integer; >= 1"})
    with pytest.raises(ConfigError, match=r"^config key 'size' must be an integer, got 32.5 \(in \[32.5, 48\]\)$"):
        check_ranges(cfg, {"size": "length 2; integer; >= 1"})  # setr's TypeError deep in torch.ones, after the run opened
    check_ranges(OmegaConf.create({"mean": [0.5]}), {"mean": "length 1|3"})  # one value for every channel, or one each
    with pytest.raises(ConfigError, match=r"^config key 'mean' must be a list of 1 or 3 values, got \[0.5, 0.5\]$"):
        check_ranges(OmegaConf.create({"mean": [0.5, 0.5]}), {"mean": "length 1|3"})


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", float("inf"), float("nan")])
def test_a_non_finite_number_is_refused_for_every_float_key(value):
    # lr=inf trained silently to a chance-level "FINISHED" run; YAML reads nan/inf as strings, .inf as a float
    with pytest.raises(ConfigError, match=r"config key 'model.lr' must be a finite number, got -?(nan|inf)$"):
        compose("toy", {"model.lr": value})


def test_unknown_preset_and_pipeline():
    with pytest.raises(ConfigError, match="valid presets: quick, paper"):
        compose("toy", {"preset": "huge"})
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'; registered: .*toy"):
        compose("nope")


def test_override_parsing_and_sweep_grid():
    assert parse_overrides(["a.b=1e-3", "c=[1,2]"]) == [("a.b", [1e-3]), ("c", [[1, 2]])]
    grid = sweep_points(["x=1,2", "y=a,b", "z=[1,2]"])
    assert len(grid) == 4 and {"x": 2, "y": "b", "z": [1, 2]} in grid
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["oops"])
    # a run id (prefix) as typed: the grammar read 0123456 as octal 42798 and 12e45678 as inf
    assert parse_overrides(["resume=0123456", "x=0123"]) == [("resume", ["0123456"]), ("x", [83])]
    assert parse_overrides(["resume=12e45678"]) == [("resume", ["12e45678"])] and parse_overrides(["resume=null"]) == [("resume", [None])]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.nope=1", "unknown config key 'model.nope'; valid keys at 'model':"),
        ("trainer.max_epochs=x", "config key 'trainer.max_epochs' expects int, got 'x' (str)"),
    ],
)
def test_cli_bad_input_prints_one_line_and_exits_nonzero(override, expected):
    result = cli("train", "toy", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_shortcuts_stand_for_dotted_keys():
    cfg = compose("toy", {"lr": 0.25})  # tests/toy/toy.yaml: shortcuts: {lr: model.lr}
    assert cfg.model.lr == 0.25 and "lr" not in cfg and "shortcuts" not in cfg


def test_every_shortcut_into_reproduce_or_bench_names_a_key_something_reads():
    """(stg_kd's `root=` set reproduce.root, which no experiment or code read: a real-data folder ignored silently)"""
    import re

    import yaml

    for conf in sorted(CONF_DIR.glob("*.yaml")):
        text = conf.read_text()
        code = "\n".join(p.read_text() for p in (CONF_DIR.parent / "pipelines" / conf.stem).glob("*.py"))
        for short, target in (yaml.safe_load(text).get("shortcuts") or {}).items():
            if target.split(".")[0] in ("reproduce", "bench"):
                read = "${" + target + "}" in text or re.search(rf"\b{re.escape(target)}\b", code)
                assert read, f"{conf}: shortcut {short} sets {target}, which no experiment (${{{target}}}) or code reads"


def test_a_key_with_no_effect_is_refused_unless_a_run_of_the_command_uses_it():
    """(livt loss.tau with loss.name=ce, compression prune.sparsity with the baseline, …: ran FINISHED, the key ignored)"""
    from common.config import check_applies

    out = cli("train", "livt", "loss.name=ce", "loss.tau=5")
    assert out.returncode == 2 and out.stderr.strip() == (
        "lightyard: error: loss.tau has no effect here: it applies when loss.name is bal_ce/bal_bce (loss.name=ce); leave it out"
    )
    vocab = cli("train", "vocab_kd", "dual.enabled=false", "loss.kd_weight=2")
    from common.runner import train

    with pytest.raises(ConfigError, match=r"^bench.beam has no effect on `lightyard train`: `lightyard bench stg_kd` reads it; leave"):
        train("stg_kd", ["bench.beam=500"])  # a grid's own settings (was: FINISHED, the key ignored)
    with pytest.raises(
        ConfigError, match=re.escape("root (reproduce.root) has no effect on `lightyard train`: `lightyard reproduce")
    ) as err:
        check_applies("hog_gcn", [compose("hog_gcn")], {"root": "/data"}, command="train")
    assert str(err.value).endswith("leave it out (a train run reads data.root=<…>)")
    check_applies("hog_gcn", [compose("hog_gcn")], {"root": "/data"}, command="reproduce")
    livt = [compose("livt", {"mgp.enabled": False})]
    check_applies("livt", livt, {"mgp.enabled": False})  # a prefix rule's own setting always applies
    check_applies("livt", livt, {"mgp": {"enabled": False}})  # also as a section
    with pytest.raises(ConfigError, match=r"^mgp.epochs has no effect here: it applies when mgp.enabled is true \(mgp.enabled=false\)"):
        check_applies("livt", livt, {"mgp.epochs": 5})
    assert "it applies when dual.enabled is true (dual.enabled=false)" in vocab.stderr
    configs = [compose("compression", {"compress.technique": t}) for t in ("baseline", "prune_unstructured")]
    check_applies("compression", configs, {"prune.sparsity": 0.9})  # a sweep where one point reads it
    with pytest.raises(ConfigError, match=r"^lowrank.rank_ratio has no effect here: it applies when compress.technique is low_rank"):
        check_applies("compression", configs, {"lowrank.rank_ratio": 0.5})  # a prefix rule (lowrank.)
    with pytest.raises(ConfigError, match=r"^lowrank has no effect here: it applies when compress.technique is low_rank"):
        check_applies("compression", configs, {"lowrank": {"rank_ratio": 0.5}})  # a whole section given at once
    iba = cli("train", "input_iba", "attribution.method=gradcam", "attribution.methods=[saliency]")
    assert "attribution.methods has no effect here: it applies when attribution.method is all" in iba.stderr
    from common.grid import plan

    plan("reproduce", "setr", {"preset": "smoke", "model.aux_layers": [2]})  # the grid's naive and pup children read it
    with pytest.raises(ConfigError, match=r"^model.aux_layers has no effect here: it applies when model.decoder is naive/pup"):
        plan("reproduce", "setr", {"preset": "smoke", "reproduce.decoders": ["mla"], "model.aux_layers": [2]})
    # a list setting: the key applies when the list holds one of the values (iiot: ran FINISHED, the key ignored)
    iiot = compose("iiot_sic_aloha", {"sim.schemes": ["aloha", "capture"]})
    with pytest.raises(ConfigError, match=re.escape("it applies when sim.schemes includes sic (sim.schemes=[aloha, capture]); leave")):
        check_applies("iiot_sic_aloha", [iiot], {"sim.max_sic_stages": 2})
    check_applies("iiot_sic_aloha", [compose("iiot_sic_aloha", {"sim.schemes": ["aloha", "sic"]})], {"sim.max_sic_stages": 2})
    heterogeneous = compose("iiot_sic_aloha", {"sim.num_nodes": 2, "sim.event_probs": [0.1, 0.3]})
    with pytest.raises(ConfigError, match=re.escape("it applies when sim.event_probs is null (sim.event_probs=[0.1, 0.3])")):
        check_applies("iiot_sic_aloha", [heterogeneous], {"sim.event_prob": 0.5})


def test_every_applies_rule_names_keys_of_its_config():

    import yaml
    from omegaconf import OmegaConf

    for conf in sorted(CONF_DIR.glob("*.yaml")):
        rules = yaml.safe_load(conf.read_text()).get("applies") or {}
        if not rules:
            continue
        cfg = compose(conf.stem)
        absent = object()
        for key, needs in rules.items():
            assert OmegaConf.select(cfg, key.rstrip("."), default=absent) is not absent, f"{conf}: {key}"
            for need, allowed in needs.items():
                assert OmegaConf.select(cfg, need, default=absent) is not absent and isinstance(allowed, list), (
                    f"{conf}: {key} needs {need}"
                )


def test_with_values_copies_and_checks():
    cfg = compose("toy")
    changed = with_values(cfg, {"model.lr": 0.5, "trainer.max_epochs": 3})
    assert (changed.model.lr, changed.trainer.max_epochs) == (0.5, 3) and cfg.model.lr != 0.5
    with pytest.raises(ConfigError, match="unknown config key 'model.lrr'"):
        with_values(cfg, {"model.lrr": 1.0})


def test_a_mapping_without_a_space_after_the_colon_is_one_line_not_a_silent_key():
    from common.config import parse_value

    assert parse_value("{img_size: 32, patch_size: 4}") == {"img_size": 32, "patch_size": 4}
    assert parse_value("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match=r"'img_size:32' reads as one key with no value; write 'img_size: 32'"):
        parse_value("{img_size:32, patch_size: 4}")
    with pytest.raises(ConfigError, match="'a:1' reads as one key"):
        parse_value("[{b: {a:1}}]")


def test_list_rules_judge_the_list_and_rules_joined_by_semicolons_all_apply():
    from omegaconf import OmegaConf

    from common.config import check_ranges

    cfg = OmegaConf.create({"a": [], "b": [8], "c": [8, 0], "d": None})
    check_ranges(cfg, {"d": "non-empty"})  # an optional key left unset passes
    with pytest.raises(ConfigError, match=r"^config key 'a' must be a non-empty list, got \[\]$"):
        check_ranges(cfg, {"a": "non-empty; > 0"})
    with pytest.raises(ConfigError, match=r"^config key 'b' must be a list of 2 values, got \[8\]$"):
        check_ranges(cfg, {"b": "length 2; >= 1"})
    with pytest.raises(ConfigError, match=r"^config key 'c' must be >= 1, got 0 \(in \[8, 0\]\)$"):
        check_ranges(cfg, {"c": "length 2; >= 1"})
    check_ranges(cfg, {"b": "non-empty; >= 1"})


def test_every_preset_of_every_pipeline_composes():
    """A config rule must not refuse what the shipped presets set (paper presets clear model.kwargs with {})."""
    from omegaconf import OmegaConf

    from common import registry
    from common.config import CONF_DIR
    from common.runner import compose

    for pipeline in registry.all_pipelines():
        presets = OmegaConf.load(pipeline.config or CONF_DIR / f"{pipeline.name}.yaml").get("presets") or {}
        assert presets, pipeline.name
        for preset in presets:
            cfg = compose(pipeline.name, {"preset": preset})
            assert cfg.preset == preset
            if presets[preset].get("model", {}).get("kwargs") == {}:  # {} clears the mapping, not merges nothing
                assert cfg.model.kwargs == {}, (pipeline.name, preset)


def test_a_config_file_is_parsed_once_per_content_and_each_caller_gets_its_own_copy(tmp_path):
    from common.config import _load_yaml

    path = tmp_path / "p.yaml"
    path.write_text("a: {b: 1}\n")
    first = _load_yaml(path)
    first.a.b = 99  # a caller's change (load_config pops and merges) stays its own
    assert _load_yaml(path).a.b == 1
    path.write_text("a: {b: 2}\n")  # same size, maybe the same mtime: read again
    assert _load_yaml(path).a.b == 2
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="p.yaml"):
        _load_yaml(path)


def test_every_key_named_seed_is_a_numpy_seed():
    """(livt mgp.seed=-1 failed inside a run with numpy's "Seed must be between 0 and 2**32 - 1"; drit's and
    compression's inner seeds took any value) — one rule for every seed key, no pipeline's checks needed."""
    for pipeline, key, value, shown in (
        ("livt", "mgp.seed", -1, "-1"),
        ("drit", "metrics.classifier.seed", 2**32, "4294967296"),
        ("stg_kd", "reproduce.seeds", [0, -1], "-1 (in [0, -1])"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}' must be in [0, 4294967295], got {shown}")):
            compose(pipeline, {key: value})
    compose("setr", {"data.seed": None, "reproduce.seeds": [0, 4294967295]})  # null (the run's seed) and the top of the range
