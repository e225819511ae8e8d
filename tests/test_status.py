"""`sdxld status` answers whatever state the root is in, and says what each daemon is doing."""

import json

from support.helpers import run_sdxld

from sdxld.status import describe_job, format_status


def test_the_current_job_reads_as_the_stage_and_its_step_of_the_whole_stage():
    assert describe_job({"job": "stage1", "phase": "stage1", "step": 2, "total": 8}) == "stage 1, step 2/8"
    assert describe_job({"job": "stage1", "phase": "stage1 refiner", "step": 7, "total": 8}) == "stage 1, step 7/8 (refiner)"
    assert describe_job({"job": "stage1"}) == "stage 1"
    upscale = {"job": "upscale", "file": "a.png", "phase": "stage3 tile 2/6", "step": 3, "total": 5}
    assert describe_job(upscale) == "upscaling a.png: stage 3 tile 2/6, step 3/5"
    assert describe_job({"job": "upscale", "file": "a.png", "phase": "stage3 latent", "step": 1, "total": 7}) == \
        "upscaling a.png: stage 3, step 1/7"
    assert describe_job({"job": "upscale", "file": "a.png"}) == "upscaling a.png"


def test_a_broken_config_is_reported_above_the_daemons_that_run_on_their_last_good_one():
    daemon = {"pid": 7, "host": "h", "state": "generating", "started": 0, "current": None, "stage1_made": 3,
              "finals_made": 0, "failed": 0, "approved_queued": 0, "loras": {"loaded": 4, "rejected": []},
              "config_error": "/r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?)"}
    text = format_status([daemon], "/r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?)")
    assert text.splitlines()[0].startswith("config.yaml invalid: /r/config.yaml: prompts.max_extra")
    assert "keeps its last good config" in text
    assert "config:     /r/config.yaml: prompts.max_extra: unknown key (did you mean 'max_extras'?); running on the last good config" in text
    stopped = format_status([dict(daemon, state="stopped")], "bad")
    assert "it would stop with exit status 78" in stopped


def test_status_in_a_folder_that_is_no_root_says_so_and_how_to_make_one(tmp_path):
    result = run_sdxld("status", "--root", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"sdxld init {tmp_path}" in result.stdout and "no sdxld daemon has run on this root" in result.stdout


def test_status_reads_a_root_whose_config_does_not_even_parse(root):
    (root / "config.yaml").write_text("model: [unclosed\n")
    result = run_sdxld("status", "--config", str(root / "config.yaml"), "--json", cwd=root.parent)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["root"] == str(root) and report["daemons"] == []
    assert "invalid YAML at line" in report["config_error"]
