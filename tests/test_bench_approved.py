"""The GPU bench's approved-image part runs (a smoke test; its numbers are never asserted). A file
of its own, so that the suite's two workers run it beside tests/test_bench.py."""

from support.helpers import tiny_gpu_bench


def test_gpu_bench_approved_image_part_runs_on_the_cpu_with_the_tiny_model(tmp_path):
    report = tiny_gpu_bench(tmp_path, "--skip", "stages,pixel,esrgan,compile,switches,throughput,loras,fast",
                            "--graphs-parts", "approved,vae")
    for row in ("graphs: approved image without the refiner, eager (baseline)",
                "graphs: approved image without the refiner, static shapes (eager backend)",
                "graphs: approved image without the refiner, static shapes (eager backend): first after a restart",
                "graphs: approved image without the refiner, eager, VAE compiled",
                "(VAE encodes and decodes within stages 2 and 3:"):
        assert row in report
