"""Command line: parse arguments, build the objects, call them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .config import EX_CONFIG, Config, ConfigError, load


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--root", type=Path, default=default, help="folder holding config.yaml (default: current folder)")
    where.add_argument("--config", type=Path, default=default, help="path of the config file")
    parser.add_argument(
        "--demo",
        action="store_true",
        default=default if suppress else False,
        help="use the built-in tiny random-weight SDXL (no downloads, CPU-friendly sizes)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=default if suppress else False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxld", description="Self-hosted SDXL image factory.")
    parser.add_argument("--version", action="version", version=f"sdxld {__version__}")
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, under=commands) -> argparse.ArgumentParser:
        # Every command takes --root/--config/--demo/-v after its name too.
        sub = under.add_parser(name, help=help)
        _common(sub, suppress=True)
        return sub

    gen = command("generate", "generate images in the foreground, until stopped or --count is reached")
    gen.add_argument("--stage1", action="store_true", help="stage 1 only: base images to curate")
    gen.add_argument("--once", action="store_true", help="make one image and exit")
    gen.add_argument("--count", type=int, help="make this many images and exit")
    gen.add_argument("--seed", type=int, help="seed of the first image (next ones: +1 each)")

    up = command("upscale", "upscale approved images through stages 2 and 3, then exit")
    up.add_argument("files", nargs="*", type=Path, help="images to upscale (default: everything in inbox/approved)")
    up.add_argument("--stage1", action="store_true", help="every stage-1 image with metadata and no final yet")

    command("run", "the daemon: continuous stage 1, upscale what lands in inbox/approved, live reload")

    status = command("status", "what the daemon(s) on this root are doing")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--probe", choices=("ready", "alive"),
                        help="exit 0 if this host's daemon has loaded its models (ready) or its loop is not stuck (alive), else 1")
    status.add_argument("--max-age", type=float, default=300.0, metavar="S", help="--probe alive: the loop's status at most S seconds old")

    stats = command("stats", "approval rate per LoRA, pair, prompt option and sampler (what learned rotation learns from)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--since", metavar="DATE", help="only images made since DATE (YYYY-MM-DD [HH:MM]); "
                       "default taste.since, 'all' for every image")
    stats.add_argument("--by", choices=("lora", "pair", "option", "sampler"), help="one table only")

    service = command("service", "systemd unit management")
    service_commands = service.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    install = command("install", "write sdxld.service for this installation and root", under=service_commands)
    install.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user) instead of a system unit")
    install.add_argument("--service-user", default="sdxld", help="system unit: the account it runs as (default sdxld)")
    install.add_argument("--target-dir", type=Path, help="write the unit here instead of the systemd folder")
    install.add_argument("--review", action="store_true", help="sdxld-review.service: the review page (`sdxld review`)")

    command("check", "validate config, load the model, list LoRAs and why any were rejected")

    review = command("review", "a local web page to approve and reject stage-1 images with a keypress")
    review.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default review.listen, 127.0.0.1:8765)")

    init = command("init", "make a root of your own: config.yaml, prompts/, loras/, weights/, inbox/, outputs/")
    init.add_argument("folder", nargs="?", type=Path, help="where (default: --root, else the current folder)")

    config_command = command("config", "config file tools")
    config_actions = config_command.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    command("migrate", "rewrite a config.yaml written for generate.py with sdxld's key names", under=config_actions)
    return parser


def config_path(args) -> Path:
    if args.config:
        return args.config
    return (args.root or Path.cwd()) / "config.yaml"


def load_config(args) -> Config:
    from .tiny import apply_demo

    path = config_path(args)
    if not path.exists():
        where = path.parent.absolute()
        raise ConfigError(
            f"not found: {where} is not an sdxld root. Make one with `sdxld init {where}` (add --demo for the "
            "built-in demo model and demo LoRAs), or point at yours with --root DIR / --config FILE",
            file=path.absolute(),
        )
    config = load(path)
    if args.demo:
        apply_demo(config)
    return config


def setup_logging(verbose: bool) -> None:
    from .service import journal_handler, under_journald

    level = logging.DEBUG if verbose else logging.INFO
    handler = journal_handler() if under_journald() else None
    if handler is not None:
        # Structured fields (SDXLD_TAG, SDXLD_STAGE) go to the journal with each line.
        logging.basicConfig(level=level, handlers=[handler], format="%(name)s: %(message)s")
    else:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            stream=sys.stderr,
        )
    if not verbose:
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    log = logging.getLogger("sdxld")
    try:
        return run_command(args, log)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - every failure gets a message of its own, never a bare traceback
        log.error("sdxld %s failed: %s: %s", args.command, type(err).__name__, err, exc_info=True)
        log.error("this is a bug in sdxld or an unexpected state of this machine; the traceback above says where")
        return 1


def run_command(args, log) -> int:
    # Commands that must work without a valid config: making a root, and looking at one.
    if args.command == "init":
        return _init(args)
    if args.command == "status":
        return _status(args)

    try:
        config = load_config(args)
    except ConfigError as err:
        log.error("%s", err)
        return EX_CONFIG

    if args.command == "config":
        from .seed_compat import migrate_file

        path = config_path(args)
        try:
            mapped, backup = migrate_file(path)
        except ConfigError as err:
            log.error("%s", err)
            return EX_CONFIG
        if not mapped:
            print(f"{path}: already uses sdxld's key names; nothing to migrate")
            return 0
        print(f"rewrote {path} (the original is {backup}):")
        for line in mapped:
            print(f"  {line}")
        return 0

    if args.command == "check":
        from .check import run_check

        return run_check(config)

    if args.command == "service":
        return _service(args, config, log)

    if args.command == "stats":
        return _stats(args, config, log)

    if args.command == "review":
        from .config import listen_address
        from .review import serve

        try:
            listen_address(args.listen or config.review.listen)
        except ValueError as err:
            log.error("--listen %s", err)
            return 2
        return serve(config, args.listen)

    if args.command == "run":
        from . import foreground
        from .daemon import Daemon
        from .models import ModelLoadError
        from .service import Notifier

        stop = foreground.StopFlag()
        notifier = Notifier()
        with stop.installed():
            try:
                return Daemon(config_path(args), config, demo=args.demo, stop=stop, notifier=notifier).run()
            except ModelLoadError as err:
                log.error("%s", err)
                return 1

    if args.command == "upscale" and args.files and args.stage1:
        log.error("give files or --stage1, not both")
        return 2
    missing = [str(f) for f in args.files if not f.is_file()] if args.command == "upscale" else []
    if missing:
        # Before minutes of model loading: a typo in a path should fail at once.
        log.error("not found (or not a file): %s; give paths of stage-1 images, relative to %s", ", ".join(missing), Path.cwd())
        return 2
    if args.command == "generate" and args.count is not None and args.count < 1:
        log.error("--count must be at least 1")
        return 2
    if args.command in ("generate", "upscale"):
        from . import foreground
        from .engine import Engine
        from .models import ModelLoadError

        stop = foreground.StopFlag()
        with stop.installed():
            try:
                engine = Engine.load(config, background_writes=args.command == "generate")
            except ModelLoadError as err:
                log.error("%s", err)
                return 1
            engine.remove_leftovers()
            if args.command == "upscale":
                return foreground.upscale(engine, files=args.files, backlog=args.stage1, stop=stop)
            return foreground.generate(
                engine, stage1_only=args.stage1, once=args.once, count=args.count, seed=args.seed, stop=stop
            )
    return 2


def _init(args) -> int:
    from .init import InitError, describe, init_root

    folder = args.folder or args.root or Path.cwd()
    try:
        report = init_root(folder, demo=args.demo)
    except InitError as err:
        logging.getLogger("sdxld").error("%s", err)
        return 1
    print(describe(report, args.demo))
    return 0


def _status(args) -> int:
    import json

    from .status import config_health, format_status, read_status

    # The root is the config file's folder, whether or not the file parses (or exists).
    config_file = config_path(args).absolute()
    root = config_file.parent
    entries = read_status(root)
    if args.probe:
        from .status import probe

        ok, why = probe(entries, args.probe, args.max_age)
        print(f"{args.probe}: {'yes' if ok else 'no'} ({why})")
        return 0 if ok else 1
    problem = config_health(config_file)
    if args.json:
        print(json.dumps({"root": str(root), "config_error": problem, "daemons": entries}, indent=2))
    else:
        print(format_status(entries, problem))
    return 0


def _stats(args, config: Config, log) -> int:
    import json

    from .layout import Layout
    from .rotation import Rotation
    from .stats import format_report, report
    from .taste import Ledger, parse_since

    try:
        since = config.taste.since_time() if args.since is None else None if args.since == "all" else parse_since(args.since)
    except ValueError as err:
        log.error("--since %s", err)
        return 2
    ledger = Ledger(Layout.from_config(config))
    ledger.load()
    data = report(ledger, args.by, since, learning=Rotation(config).describe())
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else format_report(data))
    return 0


def _service(args, config: Config, log) -> int:
    from .service import ServiceError, install_unit

    try:
        result = install_unit(
            config.root, user_unit=args.user, target_dir=args.target_dir, service_user=args.service_user,
            demo=args.demo, review=args.review,
        )
    except ServiceError as err:
        log.error("%s", err)
        return 1
    for warning in result.warnings:
        log.warning("%s", warning)
    print(f"wrote {result.path}")
    print(f"next: {result.next_steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
