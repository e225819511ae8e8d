"""config.yaml: the seed's sections and defaults, typed; every mistake named by key, exit 78."""

import re
from pathlib import Path

import pytest
import yaml
from support.helpers import run_sdxld

from sdxld.config import EX_CONFIG, Config, ConfigError, from_dict, load, to_dict

SHIPPED = Path(__file__).resolve().parents[1] / "sdxld" / "skeleton" / "config.yaml"


def test_shipped_config_is_valid_and_matches_the_seed_defaults():
    config = load(SHIPPED)
    gen = config.generation
    assert (gen.base_width, gen.base_height, gen.seed) == (768, 1344, -1)
    assert (gen.t2i.steps, gen.t2i.cfg, gen.t2i.denoise_split) == (30, 8.0, 0.8)
    assert (gen.stage2.steps, gen.stage2.cfg, gen.stage2.strength) == (22, 4.5, 0.25)
    assert (gen.stage3.steps, gen.stage3.strength, gen.stage3.tile_size, gen.stage3.tile_overlap) == (18, 0.4, 2048, 256)
    assert gen.stage3.blend_mode == "cosine" and gen.sampler == "UniPC"
    assert (config.lora.character_strength, config.lora.style_strength) == (1.0, 0.85)
    assert config.prompts.max_extras == 5
    assert (config.performance.dtype, config.memory.strategy) == ("fp16", "model_offload")
    assert (config.upscaler.tile, config.upscaler.pad) == (512, 32)
    assert config.model.base == "WhiteAiZ/Illustrious-xl-v1.0"


def test_shipped_config_spells_out_every_default():
    """The file users edit lists every key, with the same values the code defaults to."""
    from sdxld.config import to_dict

    assert yaml.safe_load(SHIPPED.read_text()) == to_dict(from_dict({}, SHIPPED.parent))


def test_empty_file_means_all_defaults(tmp_path):
    (tmp_path / "config.yaml").write_text("")
    assert load(tmp_path / "config.yaml").generation.base_width == 768


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    (folder / "config.yaml").write_text("lora:\n  style_dir: my/styles\n")
    monkeypatch.chdir(tmp_path)
    config = load(Path("somewhere/config.yaml"))
    assert config.path(config.lora.style_dir) == (folder / "my" / "styles").resolve()


def test_sizes_round_down_to_multiples_of_8():
    config = from_dict({"generation": {"base_width": 768, "base_height": 1344, "mid_scale": 1.5}}, Path("."))
    assert config.generation.scaled_size(1.5) == (1152, 2016)
    assert config.generation.scaled_size(1.37) == (1048, 1840)


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"generation": {"base_width": 770}}, "generation.base_width", "not a multiple of 8"),
        ({"generation": {"t2i": {"steps": "many"}}}, "generation.t2i.steps", "not a whole number"),
        ({"generation": {"t2i": {"steps": True}}}, "generation.t2i.steps", "not a whole number"),
        ({"generation": {"stage2": {"strength": 1.5}}}, "generation.stage2.strength", "outside (0, 1]"),
        ({"generation": {"stage3": {"strength": 0}}}, "generation.stage3.strength", "outside (0, 1]"),
        ({"generation": {"stage3": {"tile_overlap": 1024}}}, "generation.stage3.tile_overlap", "under half"),
        ({"generation": {"sampler": "DDIM"}}, "generation.sampler", "not one of"),
        ({"lora": {"strenght": 1}}, "lora.strenght", "unknown key"),
        ({"lora": {"keep_in_memory_mb": -1}}, "lora.keep_in_memory_mb", "negative"),
        ({"memory": {"strategy": "everything"}}, "memory.strategy", "not one of"),
        ({"memory": {"lora_originals": "gpu"}}, "memory.lora_originals", "gpu needs memory.strategy gpu"),
        ({"model": {"base": "./models/missing.safetensors"}}, "model.base", "not found"),
        ({"model": {"config": "no/such/folder"}}, "model.config", "not found"),
        ({"model": {"base": "not a hub id!"}}, "model", "neither an existing path nor a hub id"),
        ({"performance": {"device": "gpu0"}}, "performance.device", "not one of"),
        ({"performance": {"compile": "maximum"}}, "performance.compile", "not one of 'off', 'regional', 'full', 'graphs', 'max'"),
        ({"performance": {"quantize": "fp4"}}, "performance.quantize", "not one of 'none', 'fp8', 'int8'"),
        ({"performance": {"compile_approved": True}}, "performance.compile_approved", "for compile graphs or max, not off"),
        ({"performance": {"compile": "regional", "compile_approved": True}}, "performance.compile_approved",
         "regional and full compile stages 2 and 3 already"),
        ({"generation": {"stage3": {"tile_batch": "lots"}}}, "generation.stage3.tile_batch", "not a whole number or one of 'auto'"),
        ({"generation": {"stage3": {"tile_batch": 0}}}, "generation.stage3.tile_batch", "outside 1..64"),
        ({"generation": "big"}, "generation", "expected a section"),
        ({"outputs": {"dir": "x"}}, "outputs", "unknown key"),
    ],
)
def test_bad_values_name_the_key(data, key, words, tmp_path):
    with pytest.raises(ConfigError) as caught:
        from_dict(data, tmp_path, tmp_path / "config.yaml")
    assert caught.value.key == key
    assert words in str(caught.value)
    assert str(tmp_path / "config.yaml") in str(caught.value)


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path):
    (tmp_path / "mymodel").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers folder"):
        from_dict({"model": {"base": "mymodel", "use_refiner": False}}, tmp_path)


def test_hub_ids_and_local_files_are_told_apart(tmp_path):
    from sdxld.config import model_source

    config = from_dict({}, tmp_path)
    assert model_source(config, "owner/name").kind == "hub"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    source = model_source(config, "model.safetensors")
    assert (source.kind, source.path) == ("file", tmp_path / "model.safetensors")


def test_invalid_yaml_names_the_line(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  base: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load(tmp_path / "config.yaml")


def test_cli_exits_78_naming_file_and_key(root):
    text = (root / "config.yaml").read_text().replace("base_width: 768", "base_width: 770")
    (root / "config.yaml").write_text(text)
    result = run_sdxld("generate", "--demo", "--stage1", "--once", cwd=root)
    assert result.returncode == EX_CONFIG
    assert "generation.base_width: 770 is not a multiple of 8" in result.stderr
    assert str(root / "config.yaml") in result.stderr
    assert not (root / "outputs" / "stage1").exists()


def test_cli_exits_78_when_config_is_missing_and_says_how_to_make_a_root(tmp_path):
    for command in (["check"], ["run", "--demo"], ["generate", "--demo", "--once"]):
        result = run_sdxld(*command, cwd=tmp_path)
        assert result.returncode == EX_CONFIG
        assert f"{tmp_path} is not an sdxld root" in result.stderr
        assert f"sdxld init {tmp_path}" in result.stderr and "--demo" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where no root is


@pytest.mark.parametrize(
    "data, message",
    [
        ({"prompts": {"max_extra": 3}}, "prompts.max_extra: unknown key (did you mean 'max_extras'?)"),
        ({"genration": {}}, "genration: unknown key (did you mean 'generation'?)"),
        ({"lora": {"Style-Dir": "x"}}, "lora.Style-Dir: unknown key (did you mean 'style_dir'?)"),
        ({"generation": {"sampler": "euler a"}}, "(did you mean 'Euler a'?)"),
        ({"generation": {"sampler": "DPM++ 2M karas"}}, "(did you mean 'DPM++ 2M Karras'?)"),
        ({"memory": {"strategy": "model-offload"}}, "(did you mean 'model_offload'?)"),
        ({"performance": {"compile": "regonal"}}, "(did you mean 'regional'?)"),
        ({"generation": {"stage3": {"mode": "Latent"}}}, "(did you mean 'latent'?)"),
    ],
)
def test_unknown_keys_and_values_get_the_closest_match(tmp_path, data, message):
    with pytest.raises(ConfigError) as caught:
        from_dict(data, tmp_path)
    assert message in str(caught.value)


def test_an_unknown_key_with_no_close_match_lists_the_sections_keys(tmp_path):
    with pytest.raises(ConfigError, match="lora.xyz: unknown key; the keys of lora are: character_dir, style_dir, "):
        from_dict({"lora": {"xyz": 1}}, tmp_path)


def _leaf_count(section: dict) -> int:
    return sum(_leaf_count(v) if isinstance(v, dict) else 1 for v in section.values())


def test_every_key_of_the_shipped_config_has_a_comment():
    """A new root's config.yaml explains every setting where the user edits it."""
    lines = SHIPPED.read_text().splitlines()
    keys = [line for line in lines if re.match(r"\s*[a-z_0-9]+: *[^#\s]", line)]  # leaf keys, not sections
    assert len(keys) == _leaf_count(to_dict(from_dict({}, SHIPPED.parent)))
    for line in keys:
        assert "#" in line, f"config.yaml key without a comment: {line!r}"


def test_defaults_are_a_config():
    assert isinstance(from_dict(None, Path(".")), Config)


def test_yaml_off_and_auto_spellings_are_understood(tmp_path):
    (tmp_path / "config.yaml").write_text("performance:\n  compile: off\ngeneration:\n  stage3:\n    tile_batch: auto\n")
    config = load(tmp_path / "config.yaml")
    assert config.performance.compile == "off"  # YAML 1.1 reads a bare off as false
    assert config.generation.stage3.tile_batch == "auto"
    (tmp_path / "config.yaml").write_text("generation:\n  stage3:\n    tile_batch: 3\n")
    assert load(tmp_path / "config.yaml").generation.stage3.tile_batch == 3


def test_a_live_edit_keeps_the_loaded_model_settings_and_names_what_a_restart_would_apply(tmp_path):
    from sdxld.config import keep_loaded_settings

    loaded = from_dict({}, tmp_path)
    edited = from_dict({"model": {"base": "other/model"}, "performance": {"dtype": "bf16"},
                        "lora": {"style_strength": 0.5}}, tmp_path)
    assert keep_loaded_settings(edited, loaded) == ["model.base", "performance.dtype"]
    assert edited.model == loaded.model and edited.performance == loaded.performance
    assert edited.lora.style_strength == 0.5  # everything else applies at once


@pytest.mark.parametrize("settings, waits", [
    ({}, False),
    ({"compile": "regional"}, False),
    ({"compile": "full"}, True),
    ({"compile": "graphs"}, True),
    ({"compile": "max"}, True),
    ({"compile_vae": True}, True),  # several VAE tile shapes compile within one decode
])
def test_the_watchdog_is_told_to_wait_for_compiles_that_take_minutes_in_one_call(settings, waits):
    from sdxld.config import PerformanceConfig

    assert PerformanceConfig(**settings).builds_for_minutes is waits
