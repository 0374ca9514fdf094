"""Config tree: presets, overrides, YAML round trip, field documentation."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from avatar import config as C


def test_round_trip_equal(tmp_path):
    cfg = C.make_config(C.GenerateConfig, "smoke", ["prompt=an old sea captain", "cameras.fov_range=[25, 45]"])
    path = tmp_path / "config.yaml"
    C.save_config(cfg, path)
    assert C.load_config(C.GenerateConfig, path) == cfg
    # Plain YAML: no Python tags, loadable by any YAML reader.
    text = path.read_text()
    assert "!!python" not in text
    assert yaml.safe_load(text)["cameras"]["fov_range"] == [25.0, 45.0]


@pytest.mark.parametrize("cls", [C.GenerateConfig, C.EditConfig, C.ExportConfig])
def test_every_kind_round_trips(cls, tmp_path):
    cfg = C.make_config(cls, "fast")
    C.save_config(cfg, tmp_path / "c.yaml")
    assert C.load_config(cls, tmp_path / "c.yaml") == cfg


def test_presets_inherit_and_change_only_what_they_list():
    quality = C.make_config(C.GenerateConfig, "quality")
    fast = C.make_config(C.GenerateConfig, "fast")
    smoke = C.make_config(C.GenerateConfig, "smoke")
    assert quality == dataclasses.replace(C.GenerateConfig(), preset="quality")
    # HeadSculpt scale for quality.
    assert (quality.coarse.resolution, quality.coarse.steps) == (64, 7000)
    assert (quality.fine.resolution, quality.fine.dmtet_resolution) == (512, 156)
    # smoke inherits fast's values that it does not override...
    _, smoke_own = C.PRESETS["smoke"]
    _, fast_own = C.PRESETS["fast"]
    for key in fast_own:
        if key not in smoke_own:
            assert C.get_value(smoke, key) == C.get_value(fast, key), key
    # ...and differs from quality only on the keys of its chain, each set as listed.
    chain = C.preset_overrides("smoke")
    assert chain == {**fast_own, **smoke_own}
    for key, value in chain.items():
        assert C.get_value(smoke, key) == value, key
    changed = {k for k in C.all_keys(C.GenerateConfig) if C.get_value(smoke, k) != C.get_value(quality, k)}
    assert changed <= set(chain) | {"preset"}
    assert smoke.coarse.resolution == 32 and smoke.fine.resolution == 64 and smoke.device == "cpu"


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="unknown preset 'turbo'.*smoke"):
        C.make_config(C.GenerateConfig, "turbo")


@pytest.mark.parametrize("typo, nearest", [
    ("coarse.step=5", "coarse.steps"),
    ("corse.steps=5", "coarse.steps"),
    ("guidance.guidance_scal=7", "guidance.guidance_scale"),
    ("seeed=3", "seed"),
])
def test_override_typo_names_nearest_key(typo, nearest):
    with pytest.raises(C.ConfigError, match=f"did you mean '{nearest}'"):
        C.make_config(C.GenerateConfig, "smoke", [typo])


def test_override_types_are_checked():
    cfg = C.make_config(C.GenerateConfig, "smoke", ["coarse.lr=0.5", "coarse.steps=12", "guidance.half_precision=true",
                                                   "prompt=123", "fine.t_range=[0.1, 0.4]"])
    assert cfg.coarse.lr == 0.5 and cfg.coarse.steps == 12 and cfg.guidance.half_precision is True
    assert cfg.prompt == "123" and cfg.fine.t_range == (0.1, 0.4)
    with pytest.raises(C.ConfigError, match="'coarse.steps' expects int"):
        C.make_config(C.GenerateConfig, "smoke", ["coarse.steps=many"])
    with pytest.raises(C.ConfigError, match="expects 2 values"):
        C.make_config(C.GenerateConfig, "smoke", ["fine.t_range=[0.1]"])
    with pytest.raises(C.ConfigError, match="key=value"):
        C.make_config(C.GenerateConfig, "smoke", ["coarse.steps"])
    with pytest.raises(C.ConfigError, match="is a section"):
        C.make_config(C.GenerateConfig, "smoke", ["coarse=3"])


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E3", 1e3), ("1e+2", 100.0), (".5", 0.5), ("5.", 5.0), ("-2.5e-1", -0.25), ("3", 3.0),
    ("1_000.5", 1000.5), (" 2e-4 ", 2e-4), ("inf", float("inf")), ("-Infinity", float("-inf")),
])
def test_every_float_spelling_python_takes_is_a_float(text, value):
    """YAML 1.1 reads 1e-3 and 1E3 as strings: a float field takes what float() takes (whether
    an lr of inf is usable is the run's validation, not the parser's)."""
    cfg = C.make_config(C.GenerateConfig, "smoke", [f"coarse.lr={text}", f"fine.t_range=[{text}, 0.5]",
                                                   f"cameras.fov_range={text},45"])
    assert cfg.coarse.lr == value and isinstance(cfg.coarse.lr, float)
    assert cfg.fine.t_range == (value, 0.5) and cfg.cameras.fov_range == (value, 45.0)
    assert C.make_config(C.GenerateConfig, "smoke", ["coarse.lr=nan"]).coarse.lr != 0  # nan: for validation
    for bad in ("1e-3x", "one", "true", "[1, 2]", "0x1p-3"):  # what is no float is still refused
        with pytest.raises(C.ConfigError, match="'coarse.lr' expects float"):
            C.make_config(C.GenerateConfig, "smoke", [f"coarse.lr={bad}"])


def test_a_config_file_takes_float_spellings_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("coarse:\n  lr: 1e-3\n  t_range: [2E-2, .5]\nfine:\n  lr: 5e-4\n")
    cfg = C.make_config(C.GenerateConfig, "smoke", config_file=path)
    assert (cfg.coarse.lr, cfg.coarse.t_range, cfg.fine.lr) == (1e-3, (0.02, 0.5), 5e-4)
    C.save_config(cfg, tmp_path / "saved.yaml")
    assert C.load_config(C.GenerateConfig, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("seed", [-1, 2**32, -(2**40)])
def test_a_seed_numpy_cannot_take_is_refused_wherever_it_comes_from(seed, tmp_path):
    with pytest.raises(C.ConfigError, match=f"seed must be a whole number from 0 to 4294967295, got {seed}"):
        C.make_config(C.GenerateConfig, "smoke", [f"seed={seed}"])
    path = tmp_path / "mine.yaml"
    path.write_text(f"seed: {seed}\n")
    with pytest.raises(C.ConfigError, match=f"{path}: seed must be"):
        C.make_config(C.GenerateConfig, "smoke", config_file=path)
    assert C.make_config(C.GenerateConfig, "smoke", [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_the_default_output_root_honours_avatar_outputs(tmp_path, monkeypatch):
    monkeypatch.delenv("AVATAR_OUTPUTS", raising=False)
    assert C.make_config(C.GenerateConfig, "smoke").output_root == "outputs"
    monkeypatch.setenv("AVATAR_OUTPUTS", str(tmp_path / "elsewhere"))
    for cls in (C.GenerateConfig, C.EditConfig):
        assert C.make_config(cls, "smoke").output_root == str(tmp_path / "elsewhere")
    # --out (an override) and a config file still win over the environment.
    assert C.make_config(C.GenerateConfig, "smoke", [f"output_root={tmp_path}"]).output_root == str(tmp_path)


def test_a_preset_key_another_kind_lacks_is_skipped():
    """Presets tune generate's sections; an edit's guidance section has other keys."""
    for key in C.preset_overrides("smoke"):
        C.get_value(C.GenerateConfig(), key)  # every preset key is a generate key
    edit = C.make_config(C.EditConfig, "smoke")
    assert edit.checkpoint_every == C.preset_overrides("smoke")["checkpoint_every"]


def test_export_formats_accept_comma_list():
    cfg = C.make_config(C.ExportConfig, overrides=["formats=glb,video"])
    assert cfg.formats == ("glb", "video")


def test_yaml_file_with_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("coarse:\n  stepz: 10\n")
    with pytest.raises(C.ConfigError, match="did you mean 'coarse.steps'"):
        C.make_config(C.GenerateConfig, "smoke", config_file=path)
    path.write_text("coarse:\n  steps: 10\nseed: 7\n")
    cfg = C.make_config(C.GenerateConfig, "smoke", config_file=path, overrides=["seed=9"])
    assert cfg.coarse.steps == 10 and cfg.seed == 9  # command line wins over the file


def test_newer_config_version_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    C.save_config(C.GenerateConfig(), path)
    data = yaml.safe_load(path.read_text())
    data["config_version"] = C.CONFIG_VERSION + 1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(C.ConfigError, match="newer avatar"):
        C.load_config(C.GenerateConfig, path)


def _config_classes():
    seen, todo = [], [C.GenerateConfig, C.EditConfig, C.ExportConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp):
                todo.append(tp)
    return seen


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_field_is_documented(cls):
    docs = C.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("text, message", [("fine:\n  dmtet_resolution: [12\n  lr: : 1\n", "not valid YAML"),
                                           (None, "does not exist"), ("[" * 50_000, "nested too deeply"),
                                           ("folder", "is a folder")])
def test_unreadable_saved_config_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    if text == "folder":
        path.mkdir()
    elif text is not None:
        path.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load_config(C.GenerateConfig, path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
