"""`sdxld init DIR [--demo]`: a root of the user's own, outside the source folder; with --demo,
LoRAs that fit the built-in tiny model so rotation, live drops and `check` work at once."""

import shutil

import pytest
from support.daemons import DaemonProcess, records, set_config, wait_for
from support.helpers import run_sdxld

from sdxld.config import load, to_dict
from sdxld.init import InitError, init_root, source_checkout
from sdxld.prompt_syntax import escape


def test_init_makes_every_folder_and_a_config_with_every_default(tmp_path):
    result = run_sdxld("init", str(tmp_path / "mine"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "mine"
    for folder in ("prompts", "loras/character", "loras/style", "weights", "inbox/approved", "outputs"):
        assert (root / folder).is_dir(), folder
    for prompt in ("manual_prompt.txt", "manual_negative_prompt.txt", "prompt_options.txt"):
        assert (root / "prompts" / prompt).read_text().strip()
    config = load(root / "config.yaml")
    assert config.root == root and to_dict(config) == to_dict(type(config)())
    assert list((root / "loras" / "character").iterdir()) == []  # LoRAs only with --demo
    assert f"sdxld check --root {root}" in result.stdout


def test_init_again_fills_in_what_is_missing_and_never_overwrites(tmp_path):
    init_root(tmp_path)
    (tmp_path / "config.yaml").write_text("generation:\n  seed: 7\n")
    (tmp_path / "prompts" / "prompt_options.txt").unlink()
    report = init_root(tmp_path)
    assert report.created == ["prompts/prompt_options.txt"]
    assert "config.yaml" in report.kept
    assert load(tmp_path / "config.yaml").generation.seed == 7


def test_init_refuses_a_folder_inside_sdxlds_source_folder():
    checkout = source_checkout()
    if checkout is None:
        pytest.skip("sdxld is installed as a package here, not run from its source folder")
    with pytest.raises(InitError, match="inside sdxld's source folder .* `git status`"):
        init_root(checkout / "my-root")
    assert not (checkout / "my-root").exists()


def test_init_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_sdxld("init", str(tmp_path / "file"), cwd=tmp_path)
    assert result.returncode == 1 and "is not a folder" in result.stderr


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, tiny_cache):
    folder = tmp_path_factory.mktemp("demo") / "sdxld-demo"
    result = run_sdxld("init", str(folder), "--demo", cwd=folder.parent)
    assert result.returncode == 0, result.stderr
    assert f"next:  sdxld run --demo --root {folder}" in result.stdout
    # The user's terminal shows sdxld's own lines only: no notes libraries leave for their authors.
    assert all(" INFO sdxld." in line for line in result.stderr.splitlines()), result.stderr
    return folder


def test_a_demo_root_has_two_character_and_two_style_loras_with_trigger_words(demo_root):
    for kind, names in {"character": ["alice", "kuro"], "style": ["ink", "watercolor"]}.items():
        folder = demo_root / "loras" / kind
        assert sorted(p.stem for p in folder.glob("*.safetensors")) == names
        assert all((folder / f"{name}.txt").read_text().strip() for name in names)
    extras = demo_root / "demo-extras"
    assert {p.name for p in extras.iterdir()} >= {"oil_painting.safetensors", "oil_painting.txt", "sd15_style.safetensors", "README.txt"}


def test_check_in_a_demo_root_loads_all_four_loras(demo_root):
    result = run_sdxld("check", "--demo", cwd=demo_root)
    assert result.returncode == 0, result.stderr
    assert "LoRAs      4 loaded, 0 rejected" in result.stdout
    assert "triggers: alice_(demo), blonde hair, blue eyes" in result.stdout


def test_run_demo_in_a_demo_root_rotates_its_loras_and_takes_a_live_drop(demo_root):
    root = demo_root
    set_config(root, generation={"seed": 40})  # seeds 40, 41, ... pick the LoRAs: the run repeats
    daemon = DaemonProcess(root)
    try:
        wait_for(lambda: len(records(root)) >= 4, 120, what="four stage-1 images")
        made = records(root)
        combos = {tuple(sorted(use["name"] for use in r["loras"])) for r in made}
        assert all(len(r["loras"]) == 2 for r in made)  # one character and one style each
        assert len(combos) >= 2, combos
        for r in made:  # trigger words lead, their brackets escaped: a name, not emphasis
            assert r["prompt"].startswith(escape(r["loras"][0]["triggers"]))
            assert all(escape(use["triggers"]) in r["prompt"] for use in r["loras"])
            assert r["prompt"].startswith(r"alice_\(demo\)") or r["prompt"].startswith(r"kuro_\(demo\)")
        assert "character alice" in daemon.log or "character kuro" in daemon.log  # the log names them

        # Dropping a LoRA into the folder while it runs: it joins the rotation; a misfit is rejected.
        shutil.copy(root / "demo-extras" / "oil_painting.txt", root / "loras" / "style")
        shutil.copy(root / "demo-extras" / "oil_painting.safetensors", root / "loras" / "style")
        shutil.copy(root / "demo-extras" / "sd15_style.safetensors", root / "loras" / "style")
        wait_for(lambda: "style/oil_painting loaded" in daemon.log, 60, what="the dropped LoRA to load")
        wait_for(lambda: "sd15_style.safetensors rejected" in daemon.log, 60, what="the misfit to be rejected")
        said = []

        def lists_the_loras():
            result = run_sdxld("status", "--root", str(root), cwd=root.parent)
            said.append(result.stdout)
            return "5 loaded, 1 rejected" in result.stdout and result

        try:
            status = wait_for(lists_the_loras, 30, interval=0.5, what="status to list the LoRAs")
        except AssertionError as err:
            raise AssertionError(f"{err}; status said last:\n{said[-1] if said else ''}\n"
                                 f"the daemon's log ends:\n{daemon.log[-4000:]}") from None
        assert "sd15_style.safetensors: " in status.stdout and "another architecture" in status.stdout
        assert daemon.terminate(10) == 0
    finally:
        daemon.close()
