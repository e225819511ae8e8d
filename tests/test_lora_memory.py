"""A restart does not read every LoRA again: each file's verdict (loaded with its hash and format,
or rejected with the reason) is remembered with the file's signature and reused while the file,
the model and the checking code stay the same."""

import json
import logging
import os
from pathlib import Path

from support.helpers import checks_read

from sdxld.lora_memory import fingerprint
from sdxld.tiny import write_sd15_shaped_lora, write_tiny_lora


def library_folder(root):
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=1)
    write_tiny_lora(root / "loras/style/ink.safetensors", "diffusers", seed=2)
    write_sd15_shaped_lora(root / "loras/style/sd15.safetensors")
    (root / "loras/style/garbage.safetensors").write_bytes(os.urandom(3000))


def verdicts(engine) -> dict:
    return {f"{e.kind}/{e.path.name}": (e.status, e.reason, e.hash, e.format) for e in engine.loras.entries()}


def memory_file(root):
    (found,) = (root / ".sdxld" / "lora-checks").glob("*.json")
    return found


def test_a_restart_takes_each_unchanged_files_verdict_without_reading_it(root, make_engine, caplog):
    library_folder(root)
    first = make_engine()
    first_read = checks_read(first)
    first.sync_loras()
    assert sorted(first_read) == ["alice.safetensors", "garbage.safetensors", "ink.safetensors", "sd15.safetensors"]
    before = verdicts(first)
    assert {key: v[0] for key, v in before.items()} == {
        "character/alice.safetensors": "loaded", "style/ink.safetensors": "loaded",
        "style/sd15.safetensors": "rejected", "style/garbage.safetensors": "rejected"}

    restarted = make_engine()
    read = checks_read(restarted)
    with caplog.at_level(logging.INFO, logger="sdxld.loras"):
        restarted.sync_loras()
    assert read == [], "no file was read again"
    assert verdicts(restarted) == before, "the same hashes, formats and reasons"
    assert "LoRA character/alice loaded (LoRA, hash " in caplog.text and "checked in an earlier run" in caplog.text

    # A file that changes is checked again, and its new verdict remembered; one that leaves is forgotten.
    write_tiny_lora(root / "loras/character/alice.safetensors", seed=9)
    (root / "loras/style/garbage.safetensors").unlink()
    restarted.sync_loras()
    assert read == ["alice.safetensors"]
    assert verdicts(restarted)["character/alice.safetensors"][2] != before["character/alice.safetensors"][2]
    assert set(json.loads(memory_file(root).read_text())["files"]) == {
        "character/alice.safetensors", "style/ink.safetensors", "style/sd15.safetensors"}
    again = make_engine()
    assert checks_read(again) == [] and (again.sync_loras() or True) and checks_read(again) == []
    assert verdicts(again) == verdicts(restarted)


def test_a_file_that_could_not_be_read_is_checked_again_at_the_next_start(root, make_engine, monkeypatch):
    from pathlib import Path

    write_tiny_lora(root / "loras/style/ink.safetensors", seed=2)
    real_read_bytes = Path.read_bytes

    def flaky(path):
        if path.name == "ink.safetensors":
            raise OSError(5, "Input/output error")
        return real_read_bytes(path)

    first = make_engine()
    monkeypatch.setattr(Path, "read_bytes", flaky)
    first.sync_loras()
    monkeypatch.undo()
    assert verdicts(first)["style/ink.safetensors"][0] == "rejected"
    restarted = make_engine()
    read = checks_read(restarted)
    restarted.sync_loras()
    assert read == ["ink.safetensors"] and verdicts(restarted)["style/ink.safetensors"][0] == "loaded"


def test_a_module_missing_from_the_installation_is_not_held_against_the_file(root, make_engine, monkeypatch, caplog):
    """A LyCORIS reader that cannot import its own dependency (a partial install) says which module
    is missing, and the file is not remembered as broken: once installed, the next start loads it."""
    import sdxld.lora_files

    write_tiny_lora(root / "loras/style/ink.safetensors", seed=2)
    real_read = sdxld.lora_files.read_lora_weights

    def without_toml(pipe, data):
        raise ModuleNotFoundError("No module named 'toml'", name="toml")

    first = make_engine()
    monkeypatch.setattr(sdxld.lora_files, "read_lora_weights", without_toml)
    with caplog.at_level(logging.WARNING, logger="sdxld.loras"):
        first.sync_loras()
    monkeypatch.setattr(sdxld.lora_files, "read_lora_weights", real_read)
    status, reason = verdicts(first)["style/ink.safetensors"][:2]
    assert status == "rejected" and "Python module 'toml'" in reason and "reinstall sdxld" in reason
    restarted = make_engine()
    read = checks_read(restarted)
    restarted.sync_loras()
    assert read == ["ink.safetensors"] and verdicts(restarted)["style/ink.safetensors"][0] == "loaded"


def test_an_unreadable_memory_is_ignored_and_written_anew(root, make_engine, caplog):
    library_folder(root)
    make_engine().sync_loras()
    memory_file(root).write_text("{not json")
    restarted = make_engine()
    read = checks_read(restarted)
    with caplog.at_level(logging.WARNING, logger="sdxld.lora_memory"):
        restarted.sync_loras()
    assert len(read) == 4 and "every LoRA is checked again" in caplog.text
    assert len(json.loads(memory_file(root).read_text())["files"]) == 4


def test_verdicts_belong_to_one_models_shapes(make_engine):
    import torch

    pipe = make_engine().models.base
    before = fingerprint(pipe)
    assert fingerprint(pipe) == before, "the same model, the same fingerprint"
    name, layer = next((n, m) for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear))
    parent, _, attribute = name.rpartition(".")
    setattr(pipe.text_encoder.get_submodule(parent), attribute, torch.nn.Linear(layer.in_features, layer.out_features + 1))
    assert fingerprint(pipe) != before, "a LoRA that fitted may not fit a model of other shapes"


def test_verdicts_outlive_a_change_to_the_merging_or_rotating_code_but_not_to_the_checking_code(make_engine, tmp_path,
                                                                                                monkeypatch):
    from sdxld import lora_cache, lora_files, lora_formats, lora_merge, lora_stacks, loras

    pipe = make_engine().models.base
    before = fingerprint(pipe)
    for module, kept in ((lora_merge, True), (lora_stacks, True), (lora_cache, True), (loras, True),
                         (lora_files, False), (lora_formats, False)):
        changed = tmp_path / Path(module.__file__).name
        changed.write_text(Path(module.__file__).read_text() + "\n# changed\n")
        with monkeypatch.context() as patch:
            patch.setattr(module, "__file__", str(changed))
            assert (fingerprint(pipe) == before) is kept, module.__name__
