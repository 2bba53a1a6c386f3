"""``trex-download``: fetch, list, verify and convert the released t-ReX weights.

    trex-download --list                      models, metrics, sizes, what is cached (--json)
    trex-download trex_star trex              download (verified) into the cache
    trex-download --all --full                every model, plus the full training checkpoints
    trex-download hf-hub:org/repo@rev         a model folder from the Hugging Face Hub
    trex-download --verify                    re-hash every cached file; exit 1 on a mismatch
    trex-download trex_star_repro --full --to-safetensors exported/
    trex-download trex_star --to-timm timm_models/ --to-onnx onnx/

Exit codes: 0 ok, 1 failure (one line on stderr saying what and how to fix it), 2 usage error,
130 interrupted (see :mod:`trex_hub.cli.common`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .common import UsageError, add_debug_flag, exit_now, failing_on, nonempty, run_cli

PROG = "trex-download"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Download the released t-ReX / t-ReX* weights into the trex_hub cache "
                    "(verified, resumable, shared safely between processes).",
        epilog="Environment: TREX_HUB_CACHE (cache folder), TREX_HUB_BASE_URL (mirror), "
               "TREX_HUB_OFFLINE=1 (never use the network), HF_ENDPOINT / HF_TOKEN for hf-hub: "
               "ids.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="registry names or aliases (trex, trex_star, t-ReX*, ...) or "
                        "hf-hub:org/repo[@revision]")
    p.add_argument("--all", action="store_true", help="every released model")
    p.add_argument("--full", action="store_true",
                   help="also the full training checkpoint (projector, OCM memory, EMA copy) "
                        "where one is released")
    p.add_argument("--list", action="store_true",
                   help="table of models and of what is cached (sizes of files not cached are "
                        "asked of the server with a HEAD request, unless --offline)")
    p.add_argument("--json", action="store_true", help="with --list or --verify: JSON output")
    p.add_argument("--cache-dir", default=None, type=nonempty,
                   help="cache folder (default $TREX_HUB_CACHE or ~/.cache/trex_hub; for hf-hub: "
                        "ids the Hugging Face cache)")
    p.add_argument("--base-url", default=None, help="mirror to download from (default "
                   "$TREX_HUB_BASE_URL, else the official server)")
    p.add_argument("--offline", action="store_true",
                   help="do not use the network: only check that the files are cached")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the cached files (all, or the MODELs named) against their "
                        "manifest and the registry; delete mismatches and exit 1")
    p.add_argument("--to-safetensors", metavar="DIR", default=None, type=nonempty,
                   help="also write each model as DIR/<name>/ (model.safetensors + config.json + "
                        "README.md; an existing export there is replaced, and the output says "
                        "so); with --full the projector and prototypes are included")
    p.add_argument("--to-timm", metavar="DIR", default=None, type=nonempty,
                   help="also write each model's backbone as DIR/<name>/ in timm's layout, for "
                        "timm.create_model('hf-hub:...' or 'local-dir:DIR/<name>')")
    p.add_argument("--to-onnx", metavar="DIR", default=None, type=nonempty,
                   help="also export each model to DIR/<name>.onnx (backbone; with --full the "
                        "projector output too; input: the model's own crop); needs "
                        "trex_hub[interop]")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no output but "
                                                              "errors")
    add_debug_flag(p)
    return p


def _human(n: Optional[int], unknown: str = "?") -> str:
    if n is None:
        return unknown
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


LIST_HEAD_TIMEOUT = 3.0  # seconds: --list asks the server for the size of files not cached


def _file_status(file, cache_dir) -> Dict[str, Any]:
    from ..hub import cache

    path = cache.get_cache_dir(cache_dir) / file.filename
    man = cache.read_manifest(path)
    partial = cache.partial_path(path)
    cached = path.is_file()
    size, source = (path.stat().st_size, "cache") if cached else \
        (man["size"], "manifest") if man else \
        (file.size, "registry") if file.size is not None else (None, None)
    return {"filename": file.filename, "kind": file.kind, "path": str(path), "cached": cached,
            "partial_bytes": partial.stat().st_size if partial.is_file() else 0,
            "size": size, "size_source": source,
            "sha256": (man or {}).get("sha256") or file.sha256,
            "published_sha256": file.sha256}


def _listing(cache_dir, base_url: Optional[str] = None,
             offline: bool = False) -> List[Dict[str, Any]]:
    """The models and their files; sizes known from nothing local are asked of the server
    with a HEAD request (in parallel, ``LIST_HEAD_TIMEOUT`` s), unless offline."""
    from concurrent.futures import ThreadPoolExecutor

    from .. import mirrors, registry
    from ..hub.http import DownloadError, head_size

    rows = []
    for name in registry.list_models():
        e = registry.MODELS[name]
        rows.append({"name": e.name, "title": e.title, "aliases": list(e.aliases),
                     "imagenet_top1": e.imagenet_top1, "transfer_log_odds": e.transfer_log_odds,
                     "has_projector": e.has_projector, "hf_repo": e.hf_repo,
                     "files": [_file_status(f, cache_dir) for f in e.files()]})
    unknown = [(r["name"], f) for r in rows for f in r["files"] if f["size"] is None]
    if unknown and not offline:
        try:
            urls = [mirrors.file_url(f["filename"], base_url, name) for name, f in unknown]
        except DownloadError as exc:  # a malformed base URL: the table without those sizes
            print(f"{PROG}: warning: {exc}", file=sys.stderr)
            return rows
        with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
            sizes = list(pool.map(lambda u: head_size(u, LIST_HEAD_TIMEOUT), urls))
        for (_, f), size in zip(unknown, sizes):
            if size is not None:
                f["size"], f["size_source"] = size, "server"
    return rows


def _print_table(rows: List[Dict[str, Any]], offline: bool = False) -> None:
    header = ("name", "top-1", "log-odds", "projector", "size", "cached")
    lines = [header]
    for r in rows:
        back = r["files"][0]
        full = r["files"][1] if len(r["files"]) > 1 else None

        def state(f):
            if f["cached"]:
                return "yes"
            return f"partial ({_human(f['partial_bytes'])})" if f["partial_bytes"] else "no"

        cached = state(back) + (f", full: {state(full)}" if full else "")
        unknown = "not cached" if offline else "?"  # offline: nothing to ask
        size = _human(back["size"], unknown) + (f" + {_human(full['size'], unknown)}"
                                                if full else "")
        lines.append((r["name"], f"{r['imagenet_top1']:.1f}", f"{r['transfer_log_odds']:.4f}",
                      "yes" if r["has_projector"] else "no", size, cached))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


def _resolve(names: Sequence[str], everything: bool) -> List[str]:
    from .. import registry
    from ..hub.hf import is_hf_id, parse_hf_id

    out: List[str] = []
    for n in (registry.list_models() if everything else []) + list(names):
        if is_hf_id(n):
            key = n
            try:  # the id and revision are checked before any network or disk access
                parse_hf_id(n)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        else:
            try:
                key = registry.get_entry(n).name
            except registry.UnknownModelError as exc:
                raise UsageError(str(exc)) from None
        if key not in out:
            out.append(key)
    return out


def _verify(names: List[str], cache_dir, as_json: bool, quiet: bool) -> int:
    from .. import registry
    from ..hub import cache
    from ..hub.hf import HF_PREFIX, is_hf_id, verify_snapshot

    root = cache.get_cache_dir(cache_dir)
    known = {f.filename: f for e in registry.MODELS.values() for f in e.files()}
    if names:
        targets = [f for n in names if not is_hf_id(n) for f in registry.MODELS[n].files()]
        files = [(root / f.filename, f) for f in targets if (root / f.filename).is_file()]
    else:
        seen = {p.name[:-len(cache.MANIFEST_SUFFIX)]
                for p in root.glob("*" + cache.MANIFEST_SUFFIX)} if root.is_dir() else set()
        seen |= {n for n in known if (root / n).is_file()}
        files = [(root / n, known.get(n)) for n in sorted(seen) if (root / n).is_file()]
    results, absent = [], []
    for n in (n for n in names if is_hf_id(n)):  # the Hugging Face cache, checked by blob name
        try:
            results += verify_snapshot(n[len(HF_PREFIX):], cache_dir=cache_dir)
        except cache.OfflineError:
            absent.append(n)
    bad = sum(r["ok"] is False for r in results)
    for path, info in files:
        res = cache.check_cached(path, sha256=info.sha256 if info else None,
                                 size=info.size if info else None, full=True)
        if not res.ok:
            bad += 1
            cache.remove_cached(path)  # the manifest stays: a new download must match it
        results.append({"file": str(path), "ok": res.ok, "sha256": res.sha256, "size": res.size,
                        "problem": res.reason or None})
    if as_json:
        print(json.dumps({"cache_dir": str(root), "files": results, "mismatches": bad,
                          "not_cached": absent}, indent=2))
    else:
        for r in results:
            if r["ok"] and not quiet:
                print(f"ok        {r['file']}  ({_human(r['size'])}, sha256 {r['sha256']})")
            elif r["ok"] is None and not quiet:
                print(f"?         {r['file']}: {r['problem']}")
            elif not r["ok"]:
                print(f"MISMATCH  {r['file']}: {r['problem']}; deleted, download it again",
                      file=sys.stderr)
        for n in absent:
            print(f"not cached: {n} (nothing of it in the Hugging Face cache)", file=sys.stderr)
        if not results and not absent and not quiet:
            print(f"nothing cached in {root}")
        elif bad and not quiet:
            print(f"{bad} of {len(results)} cached files failed verification", file=sys.stderr)
    return 1 if bad else 0


# the --to-* options: (flag, attribute, what each model becomes under DIR)
_DESTINATIONS = (("--to-safetensors", "to_safetensors", "DIR/<name>/"),
                 ("--to-timm", "to_timm", "DIR/<name>/"),
                 ("--to-onnx", "to_onnx", "DIR/<name>.onnx"))


def _export_name(key: str) -> str:
    """What a model's export is called under a --to-* folder (``org--repo`` for a Hub id)."""
    from ..hub.hf import is_hf_id, parse_hf_id

    return parse_hf_id(key)[0].replace("/", "--") if is_hf_id(key) else key


def _check_exports(names: List[str], args: argparse.Namespace) -> None:
    """The --to-* destinations and the ONNX exporter's packages, checked before anything is
    downloaded (they were found wrong only after the download, in raw errno lines)."""
    seen: Dict[Path, str] = {}
    for flag, attr, layout in _DESTINATIONS:
        value = getattr(args, attr)
        if value is None:
            continue
        root = Path(value)
        takes = f"{flag} takes a folder (each model is written as {layout})"
        if root.exists() and not root.is_dir():
            raise UsageError(f"{takes}; '{value}' is a file: name a folder (it is created if "
                             "missing)")
        if attr == "to_onnx" and root.suffix.lower() == ".onnx" and not root.exists():
            raise UsageError(f"{takes}; '{value}' looks like a file name: name the folder (the "
                             "file is named after the model)")
        parent = next((p for p in root.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UsageError(f"{takes}; '{parent}' in '{value}' is a file: name a folder")
        folder = attr != "to_onnx"
        for name in names:
            target = root / (_export_name(name) + ("" if folder else ".onnx"))
            if target.exists() and target.is_dir() != folder:
                raise UsageError(f"{flag}: '{target}' is a {'file' if folder else 'folder'}, "
                                 f"where the export of {name} goes; move it away or name "
                                 "another DIR")
        if folder:
            other = seen.setdefault(root.resolve(), flag)
            if other != flag:
                raise UsageError(f"{other} and {flag} name the same folder, so one export "
                                 "would replace the other; give each its own DIR")
    if args.to_onnx:
        from ..onnx_export import require_exporter

        require_exporter()


def _download(names: List[str], args: argparse.Namespace) -> int:
    from .. import registry
    from ..checkpoint import build_model, read_checkpoint
    from ..hub import hf
    from ..loader import fetch
    from ..resolve import resolve

    progress = not args.quiet
    exporting = bool(args.to_safetensors or args.to_timm or args.to_onnx)
    for name in names:
        if hf.is_hf_id(name):
            src = resolve(name)
            folder = hf.download_model(src.hf_repo, cache_dir=args.cache_dir,
                                       revision=src.revision, offline=args.offline or None,
                                       progress=progress)
            ckpt = read_checkpoint(folder)  # as load() will read it: a repo it refuses fails now
            if not args.quiet:
                print(folder)
            if exporting:
                model = build_model(ckpt, projector=ckpt.has_projector,
                                    name=ckpt.config.get("name"))
                _export(model, _export_name(name), args)
            continue
        entry = registry.get_entry(name)
        wanted = [False] + ([True] if args.full and entry.full_file is not None else [])
        if args.full and entry.full_file is None and not args.quiet:
            print(f"{entry.name}: no full training checkpoint is released (backbone only)",
                  file=sys.stderr)
        path = None
        for full in wanted:
            path = fetch(entry.name, full=full, cache_dir=args.cache_dir, base_url=args.base_url,
                         progress=progress, offline=args.offline or None)
            if not args.quiet:
                print(path)
        if exporting and path is not None:
            model = build_model(read_checkpoint(path), projector=wanted[-1], name=entry.name,
                                preprocess=entry.preprocess.to_dict())
            _export(model, entry.name, args)
    return 0


def _export(model, name: str, args: argparse.Namespace) -> None:
    from ..publish import save_pretrained

    def report(target: Path, write) -> None:
        replaced = target.exists()  # re-running into the same DIR replaces (file by file,
        path = write(target)  # each atomically), as before; the output now says so
        if not args.quiet:
            print(f"wrote {path}" + (" (replaced the existing export)" if replaced else ""))

    if args.to_safetensors:
        report(Path(args.to_safetensors) / name, lambda p: save_pretrained(model, p))
    if args.to_timm:
        report(Path(args.to_timm) / name, lambda p: save_pretrained(model, p, format="timm"))
    if args.to_onnx:
        from ..onnx_export import export_onnx

        head = "projector" if model.has_projector else "backbone"
        # no image_size: the graph takes the model's own crop, as its metadata says
        report(Path(args.to_onnx) / f"{name}.onnx", lambda p: export_onnx(model, p, head=head))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(PROG, lambda: _parser().parse_args(argv), _main,
                   interrupted="interrupted; run the same command again to resume")


def _main(args: argparse.Namespace) -> int:
    logger = logging.getLogger("trex_hub")
    level = logger.level
    if args.quiet:  # retry notices are warnings; only errors remain
        logger.setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from ..api import ModelLoadError
    from ..checkpoint import CheckpointError
    from ..hub.cache import is_offline
    from ..hub.http import DownloadError

    with failing_on(DownloadError, CheckpointError, ModelLoadError, ValueError, OSError,
                    ImportError):
        if args.json and not (args.list or args.verify):
            raise UsageError("--json goes with --list or --verify")
        names = _resolve(args.models, args.all)
        if names and not args.verify:
            _check_exports(names, args)
        if args.list:
            offline = bool(args.offline) or is_offline()
            rows = _listing(args.cache_dir, args.base_url, offline)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_table(rows, offline)
            if not names and not args.verify:
                return 0
        if args.verify:
            return _verify(names, args.cache_dir, args.json, args.quiet)
        if not names:
            raise UsageError("name at least one MODEL (see --list), or use --all, --list or "
                             "--verify")
        return _download(names, args)


if __name__ == "__main__":  # pragma: no cover
    exit_now(main())
