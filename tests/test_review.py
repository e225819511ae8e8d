"""`sdxld review` over HTTP: keypress moves (approve, reject, undo, retry) rename exactly the right
files with their sidecars; names, hosts, tokens and cross-site requests are checked."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from sdxld import store
from sdxld.config import load
from sdxld.init import init_root
from sdxld.layout import Layout
from sdxld.records import LoraUse, Record
from sdxld.review import allowed_hosts
from sdxld.review.app import create_app

LOCAL = "http://127.0.0.1:8765"


@pytest.fixture
def layout(tmp_path):
    root = init_root(tmp_path / "root").root
    return Layout.from_config(load(root / "config.yaml"))


def stage1_image(layout, tag, character="alice", style="ink", prompt="1girl, city", sidecar=False):
    """A stage-1 image as sdxld writes it: the PNG, its record in outputs/metadata/."""
    layout.stage1.mkdir(parents=True, exist_ok=True)
    layout.metadata.mkdir(parents=True, exist_ok=True)
    name = store.image_name(tag, "stage1", 64, 64)
    Image.new("RGB", (64, 64), (len(tag) * 20 % 255, 90, 120)).save(layout.stage1 / name)
    record = Record(tag=tag, prompt=prompt, negative="lowres", seed=7, width=64, height=64, sampler="Euler a",
                    steps=8, cfg=5.0, loras=[LoraUse("character", character, f"{character}.safetensors", 1.0, "a" * 12),
                                             LoraUse("style", style, f"{style}.safetensors", 0.85, "b" * 12)],
                    files={"stage1": name})
    (layout.metadata / f"{tag}.json").write_text(record.to_json())
    if sidecar:
        (layout.stage1 / f"{tag}.json").write_text(record.to_json())
    return name


def client(layout, token=None, hosts=None):
    app = create_app(layout, allowed_hosts=hosts or allowed_hosts("127.0.0.1"), token=token)
    return TestClient(app, base_url=LOCAL)


def csrf_of(http) -> str:
    page = http.get("/").text
    return page.split('name="csrf" content="', 1)[1].split('"', 1)[0]


def post(http, verb, names=(), **headers):
    return http.post(f"/api/{verb}", json={"names": list(names)}, headers={"X-CSRF-Token": csrf_of(http), **headers})


def test_approve_moves_exactly_that_image_and_its_sidecar_by_rename(layout):
    first = stage1_image(layout, "20260101_000001", sidecar=True)
    other = stage1_image(layout, "20260101_000002")
    inode = (layout.stage1 / first).stat().st_ino
    http = client(layout)

    response = post(http, "approve", [first])

    assert response.status_code == 200, response.text
    assert response.json()["names"] == [first]
    assert sorted(p.name for p in layout.approved.iterdir()) == sorted([first, "20260101_000001.json"])
    assert (layout.approved / first).stat().st_ino == inode  # renamed, not copied
    assert [p.name for p in layout.stage1.iterdir()] == [other]
    assert (layout.metadata / "20260101_000001.json").exists()  # the shared record store stays


def test_reject_then_undo_puts_the_files_back_and_a_batch_is_one_undo(layout):
    names = [stage1_image(layout, f"20260101_00000{i}") for i in range(1, 4)]
    http = client(layout)

    assert post(http, "reject", names[:1]).status_code == 200
    assert [p.name for p in (layout.outputs / "rejected").iterdir()] == names[:1]
    assert post(http, "approve", names[1:]).status_code == 200
    assert sorted(p.name for p in layout.approved.iterdir()) == names[1:]

    undone = post(http, "undo")
    assert undone.json()["verb"] == "approve" and sorted(undone.json()["names"]) == names[1:]
    assert not any(layout.approved.iterdir())
    assert post(http, "undo").json()["verb"] == "reject"
    assert sorted(p.name for p in layout.stage1.iterdir()) == names
    nothing = post(http, "undo")
    assert nothing.status_code == 409 and nothing.json()["error"] == "nothing to undo"


def test_undo_after_the_daemon_took_the_image_says_so(layout):
    name = stage1_image(layout, "20260101_000001")
    http = client(layout)
    post(http, "approve", [name])
    layout.processing.mkdir(parents=True)
    os.rename(layout.approved / name, layout.processing / f"owner__{name}")  # what a claim does
    response = post(http, "undo")
    assert response.status_code == 409 and "daemon may have started upscaling it" in response.json()["error"]


def test_retry_moves_a_failed_image_back_to_approved_and_undo_restores_its_error_report(layout):
    layout.failed.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(layout.failed / "odd.png")
    (layout.failed / "odd.png.error.txt").write_text("odd.png: no record\n")
    http = client(layout)

    queue = http.get("/api/pile/failed").json()
    assert queue["items"][0]["name"] == "odd.png" and queue["items"][0]["error"] == "odd.png: no record\n"
    assert post(http, "retry", ["odd.png"]).status_code == 200
    assert [p.name for p in layout.approved.iterdir()] == ["odd.png"]
    assert not any(layout.failed.iterdir())
    post(http, "undo")
    assert sorted(p.name for p in layout.failed.iterdir()) == ["odd.png", "odd.png.error.txt"]


@pytest.mark.parametrize("name", ["../config.yaml", "/etc/passwd", "..", "stage1/../../config.yaml", "x\x00.png"])
def test_names_that_are_not_in_the_folder_are_refused(layout, name):
    stage1_image(layout, "20260101_000001")
    http = client(layout)
    response = post(http, "approve", [name])
    assert response.status_code == 404 and "is not in outputs/stage1/" in response.json()["error"]
    assert (layout.root / "config.yaml").exists() and not any(layout.approved.iterdir()) if layout.approved.exists() else True


@pytest.mark.parametrize("path", ["/image/stage1/..%2F..%2Fconfig.yaml", "/image/stage1/%2Fetc%2Fpasswd",
                                  "/image/../config.yaml", "/thumb/stage1/..%2Fmetadata%2Fx.json", "/image/weights/x.pth",
                                  "/static/..%2F..%2F__init__.py"])
def test_nothing_outside_the_piles_is_served(layout, path):
    stage1_image(layout, "20260101_000001")
    response = client(layout).get(path)
    assert response.status_code == 404
    assert "root" not in response.text and "review:" not in response.text


def test_a_symlink_in_a_pile_is_neither_listed_served_nor_moved(layout, tmp_path):
    stage1_image(layout, "20260101_000001")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (layout.stage1 / "20260101_000009_stage1_64x64.png").symlink_to(secret)
    http = client(layout)
    assert [i["name"] for i in http.get("/api/pile/stage1").json()["items"]] == ["20260101_000001_stage1_64x64.png"]
    assert http.get("/image/stage1/20260101_000009_stage1_64x64.png").status_code == 404
    assert post(http, "approve", ["20260101_000009_stage1_64x64.png"]).status_code == 404
    assert secret.exists()


def test_a_wrong_host_is_refused(layout):
    http = client(layout)
    assert http.get("/", headers={"Host": "evil.example:8765"}).status_code == 421
    assert http.get("/", headers={"Host": "localhost:8765"}).status_code == 200


def test_beyond_loopback_every_request_needs_the_token(layout):
    stage1_image(layout, "20260101_000001")
    token = "t" * 32
    http = client(layout, token=token, hosts=allowed_hosts("0.0.0.0", "studio.lan"))
    assert http.get("/api/pile/stage1", headers={"Host": "studio.lan:8765"}).status_code == 401
    assert http.get("/image/stage1/20260101_000001_stage1_64x64.png").status_code == 401
    assert http.get("/", params={"token": "wrong" * 8}).status_code == 401

    entered = http.get("/", params={"token": token}, follow_redirects=False)
    assert entered.status_code == 303 and "token" not in entered.headers["location"]
    assert http.get("/api/pile/stage1").status_code == 200  # the cookie carries it from here on
    fresh = client(layout, token=token)
    assert fresh.get("/api/pile/stage1", headers={"X-Review-Token": token}).status_code == 200


def test_a_cross_site_post_is_refused(layout):
    name = stage1_image(layout, "20260101_000001")
    http = client(layout)
    no_csrf = http.post("/api/approve", json={"names": [name]})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    other_site = post(http, "approve", [name], Origin="https://evil.example")
    assert other_site.status_code == 403 and "another site" in other_site.text
    form = http.post("/api/approve", data={"names": name}, headers={"Origin": LOCAL})
    assert form.status_code == 403
    assert http.get("/api/approve").status_code == 405
    assert not layout.approved.exists() or not any(layout.approved.iterdir())


def test_a_file_deleted_mid_request_is_a_clear_error_and_nothing_moves(layout, monkeypatch):
    names = [stage1_image(layout, f"20260101_00000{i}") for i in (1, 2)]
    real_rename = os.rename

    def rename(source, destination):
        if str(source).endswith(names[1]):
            os.unlink(source)  # the user deleted it in a file manager just now
        return real_rename(source, destination)

    monkeypatch.setattr("sdxld.review.piles.os.rename", rename)
    response = post(client(layout), "approve", names)
    assert response.status_code == 409
    assert f"{names[1]} vanished from outputs/stage1/" in response.json()["error"]
    assert [p.name for p in layout.stage1.iterdir()] == [names[0]]  # the first went back
    assert not any(layout.approved.iterdir())


def test_the_pile_pages_and_filters_by_lora_and_prompt_text(layout):
    for i in range(7):
        stage1_image(layout, f"20260101_00000{i}", character="alice" if i % 2 else "kuro", prompt=f"1girl, scene {i}")
        os.utime(layout.stage1 / store.image_name(f"20260101_00000{i}", "stage1", 64, 64), (1000 + i, 1000 + i))
    http = client(layout)
    page = http.get("/api/pile/stage1", params={"limit": 3, "offset": 3}).json()
    assert page["total"] == 7 and [i["name"][:15] for i in page["items"]] == ["20260101_000003", "20260101_000002", "20260101_000001"]
    oldest = http.get("/api/pile/stage1", params={"limit": 1, "order": "oldest"}).json()
    assert oldest["items"][0]["name"].startswith("20260101_000000")
    alice = http.get("/api/pile/stage1", params={"character": "alice", "facets": 1}).json()
    assert alice["total"] == 3 and alice["loras"] == {"character": ["alice", "kuro"], "style": ["ink"]}
    assert http.get("/api/pile/stage1", params={"q": "SCENE 4"}).json()["total"] == 1
    record = http.get("/api/record/stage1/" + page["items"][0]["name"]).json()["record"]
    assert record["prompt"] == "1girl, scene 3" and record["loras"][0]["name"] == "alice"


def test_five_thousand_waiting_images_list_a_page_quickly(layout):
    layout.stage1.mkdir(parents=True)
    for i in range(5000):
        (layout.stage1 / f"20260102_{i:06d}_stage1_64x64.png").write_bytes(b"")
    http = client(layout)
    http.get("/api/pile/stage1")
    start = time.perf_counter()
    page = http.get("/api/pile/stage1", params={"offset": 4900, "limit": 100}).json()
    assert time.perf_counter() - start < 1.0
    assert page["total"] == 5000 and len(page["items"]) == 100


def test_thumbnails_are_made_once_and_kept_under_the_state_folder(layout):
    name = stage1_image(layout, "20260101_000001")
    http = client(layout)
    first = http.get(f"/thumb/stage1/{name}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    cached = list((layout.state / "thumbnails").iterdir())
    assert len(cached) == 1
    made = cached[0].stat().st_mtime_ns
    assert http.get(f"/thumb/stage1/{name}").content == first.content
    assert cached[0].stat().st_mtime_ns == made
    (layout.stage1 / "broken_stage1_64x64.png").write_bytes(b"not an image")
    broken = http.get("/thumb/stage1/broken_stage1_64x64.png")
    assert broken.status_code == 415 and "cannot be shown" in broken.json()["error"]


def test_an_image_keeps_its_thumbnail_as_it_moves_between_piles(layout):
    name = stage1_image(layout, "20260101_000001")
    http = client(layout)
    first = http.get(f"/thumb/stage1/{name}").content
    assert post(http, "approve", [name]).status_code == 200
    assert http.get(f"/thumb/approved/{name}").content == first
    assert len(list((layout.state / "thumbnails").iterdir())) == 1, "one thumbnail per image, not per pile"


def test_the_thumbnail_folder_stays_under_its_cap_oldest_first(tmp_path, monkeypatch):
    from sdxld.review import thumbnails as module

    images = []
    for index in range(6):
        images.append(tmp_path / f"image{index}.png")
        Image.new("RGB", (640, 480), (index * 40, 90, 120)).save(images[-1])
    cache = module.Thumbnails(tmp_path / "thumbnails")
    made = [cache.get(image) for image in images]
    for age, thumbnail in enumerate(reversed(made)):  # image0's is the oldest
        os.utime(thumbnail, ns=(time.time_ns() - age * 10**9,) * 2)
    size = made[0].stat().st_size
    cache.max_bytes = 3 * size + size // 2
    assert cache.prune() == 3
    assert [t.exists() for t in made] == [False, False, False, True, True, True]
    assert cache.get(images[0]).exists(), "a pruned thumbnail is made again when viewed"

    # Past PRUNE_EVERY new thumbnails the cap is applied on its own; at start too.
    monkeypatch.setattr(module, "PRUNE_EVERY", 2)
    cache.prune()
    cache.get(images[1])
    cache.get(images[2])  # the second new one since the last prune
    assert sum(t.stat().st_size for t in (tmp_path / "thumbnails").iterdir()) <= cache.max_bytes
    assert module.Thumbnails(tmp_path / "thumbnails", max_bytes=0).folder.exists()
    assert not list((tmp_path / "thumbnails").iterdir())


def test_status_changes_when_a_pile_does_and_finals_find_their_stage1_image(layout):
    http = client(layout)
    before = http.get("/api/status").json()
    name = stage1_image(layout, "20260101_000001")
    after = http.get("/api/status").json()
    assert after["signature"] != before["signature"] and after["counts"]["stage1"] == 1
    assert after["daemons"] == []

    layout.done.mkdir(parents=True)
    os.rename(layout.stage1 / name, layout.done / name)
    layout.final.mkdir(parents=True)
    final = store.image_name("20260101_000001", "final", 256, 256)
    Image.new("RGB", (256, 256)).save(layout.final / final)
    finals = http.get("/api/pile/final").json()
    assert finals["items"][0]["before"] == ["done", name]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sdxld_review_starts_without_torch_and_serves_the_page(layout):
    import urllib.request

    port = free_port()
    command = [sys.executable, "-X", "importtime", "-m", "sdxld.cli", "review", "--root", str(layout.root),
               "--listen", f"127.0.0.1:{port}"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.strip() == f"sdxld review of {layout.root}: http://127.0.0.1:{port}/", line
        for _ in range(100):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.05)
        elapsed = time.monotonic() - started
        assert "<title>sdxld review</title>" in page
    finally:
        process.terminate()
        _, imports = process.communicate(timeout=10)
    modules = {row.rsplit("|", 1)[-1].strip() for row in imports.splitlines() if row.startswith("import time:")}
    assert "starlette" in modules and "uvicorn" in modules
    assert not {"torch", "diffusers", "transformers"} & modules
    assert elapsed < 10, elapsed


def test_the_taste_numbers_follow_the_moves_and_match_sdxld_stats(layout):
    from sdxld.stats import report
    from sdxld.taste import Ledger

    names = [stage1_image(layout, f"20261127_10000{i}", character=("alice", "kuro")[i % 2]) for i in range(4)]
    http = client(layout)
    assert http.get("/api/taste").json()["totals"] == {"approved": 0, "rejected": 0, "waiting": 4, "rate": None,
                                                       "low": 0.0, "high": 1.0}
    post(http, "approve", names[:1])
    post(http, "reject", names[1:3])
    taste = http.get("/api/taste?by=lora").json()
    assert [group["group"] for group in taste["groups"]] == ["character", "style"]
    rows = {arm["arm"]: (arm["approved"], arm["rejected"], arm["waiting"]) for arm in taste["groups"][0]["arms"]}
    assert rows == {"alice": (1, 1, 0), "kuro": (0, 1, 1)}
    ledger = Ledger(layout)
    ledger.load()
    assert taste == report(ledger, "lora")
    assert http.get("/api/taste?by=nonsense").status_code == 404
