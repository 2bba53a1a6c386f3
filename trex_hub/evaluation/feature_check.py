"""``--format features``: are the features those of the model ``--models`` names?

trex-extract records in each output's meta.json the model argument it was given (``model``),
the head and the digest of the loaded weights (``weights_sha256``, the one of
:func:`trex_hub.model.weights_digest`). Before any probe is fitted, :func:`check_feature_model`
compares them with the ``--models`` entry, on the cheapest evidence that settles it and never
with a download:

* a registry name against a recorded registry name (aliases included): the same model or not,
  nothing loaded;
* a local checkpoint file or folder, ``random:NAME``, or a registry model whose released file is
  already in the download cache: loaded on the CPU with the features' head (about 0.2 s for a
  ResNet-50), and its weights digest compared with the recorded one (the online network, then
  the EMA copy of a full training checkpoint, since the meta.json does not say which was used);
* anything else (a folder name that is not a model, an ``hf-hub:`` id, a registry model that is
  not cached, outputs without a recorded digest): not checked; ``--models`` then only labels the
  result, and the log says which model the meta.json records.

A mismatch is an :class:`~.options.EvalUsageError` naming both models and the fix; a trainval
file and a test file extracted with different weights are an :class:`~.options.EvalError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .models import RANDOM_PREFIX, load_model
from .options import EvalError, EvalUsageError


class Recorded:
    """What the meta.json files of one model's feature files say about the weights."""

    def __init__(self, files: Sequence[Path]) -> None:
        from ..featurefile import existing_paths, read_meta

        self.folder = Path(files[0]).parent
        self.meta: Optional[Path] = None
        self.model: Optional[str] = None
        self.digest: Optional[str] = None
        self.head = "backbone"
        seen: List[Tuple[Path, Dict[str, Any]]] = []
        for f in files:
            meta = read_meta(f)
            if meta is not None:
                seen.append((existing_paths(f)["meta"], meta))
        heads = {m.get("head") for _, m in seen} - {None}
        if len(heads) > 1:  # a projector's digest covers the projector: not another model
            (pa, a), (pb, b) = seen[0], seen[-1]
            raise EvalError(
                f"{pa} and {pb} record different heads (--head {a.get('head')} and --head "
                f"{b.get('head')}): the trainval and test features must be the same kind; "
                "extract both splits again with one --head")
        digests = [(p, m) for p, m in seen if isinstance(m.get("weights_sha256"), str)]
        if len({m["weights_sha256"] for _, m in digests}) > 1:
            (pa, a), (pb, b) = digests[0], digests[-1]
            raise EvalError(
                f"{pa} and {pb} record different weights ({a.get('model')}, sha256 "
                f"{a['weights_sha256'][:12]}; {b.get('model')}, sha256 "
                f"{b['weights_sha256'][:12]}): the trainval and test features must come from "
                "one model; extract both splits again with the same one")
        for path, meta in digests or seen:
            self.meta = path
            if isinstance(meta.get("model"), str) and meta["model"]:
                self.model = meta["model"]
            self.digest = meta.get("weights_sha256")
            self.head = "projector" if meta.get("head") == "projector" else "backbone"
            break


def _release_candidates(name: str, head: str) -> Iterator[Tuple[str, bool]]:
    """(cached file, ema) of registry model ``name`` that trex-extract could have loaded with
    ``head``, for those already in the download cache (nothing is downloaded)."""
    from .. import registry
    from ..hub.cache import cached_path

    entry = registry.get_entry(name)
    files = [(entry.full_file if head == "projector" else entry.backbone_file, False)]
    if head != "projector":  # the full checkpoint's online backbone is the backbone file's
        files.append((entry.full_file, False))
    files.append((entry.full_file, True))
    for info, ema in files:
        path = cached_path(info.filename) if info is not None else None
        if path is not None:
            yield str(path), ema


def _candidates(spec: str, head: str) -> Tuple[List[Tuple[str, bool]], str]:
    """The loadable forms of ``spec`` (path or spec, ema) and, when there are none, why."""
    from .. import registry
    from ..hub.hf import is_hf_id

    if registry.is_known(spec):
        found = list(_release_candidates(spec, head))
        return found, f"the released file of {registry.get_entry(spec).name} is not in the " \
            "download cache, and nothing is downloaded for this check"
    if spec.startswith(RANDOM_PREFIX):
        return [(spec, False)], ""
    if is_hf_id(spec):
        return [], "an hf-hub: id, which would have to be downloaded"
    if Path(spec).expanduser().exists():
        return [(spec, False), (spec, True)], ""
    return [], "neither a registry name nor an existing checkpoint"


def _digest_matches(spec: str, recorded: Recorded) -> Tuple[Optional[bool], str]:
    """Whether ``spec``'s weights are the recorded ones (None: cannot tell), and its digest or
    why it cannot tell."""
    from .. import registry
    from ..model import weights_digest

    if registry.is_known(spec) and recorded.model and registry.is_known(recorded.model):
        same = registry.get_entry(spec).name == registry.get_entry(recorded.model).name
        return same, ""
    candidates, why = _candidates(spec, recorded.head)
    if not candidates:
        return None, why
    if not recorded.digest:
        return None, f"{recorded.meta or 'no meta.json'} records no weights digest"
    ours, problem = None, ""
    for src, ema in candidates:
        if ema and ours is None and problem:  # the online network did not load either
            break
        try:
            model = load_model(src, "cpu", projector=recorded.head == "projector", ema=ema)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            problem = problem or str(exc)
            continue
        digest = weights_digest(model)
        if digest == recorded.digest:
            return True, digest
        ours = ours or digest
    if ours is None:
        return None, f"it could not be loaded ({problem})"
    return False, ours


def check_feature_model(spec: Optional[str], files: Sequence[Path], several: bool,
                        log: Callable[[str], None] = lambda m: None) -> None:
    """Refuse ``--models spec`` for feature ``files`` extracted with other weights (see the
    module doc); log what was checked, or that ``spec`` only labels the result."""
    recorded = Recorded(files)
    made_with = recorded.model or "an unknown model"
    if spec is None:
        if recorded.model:
            log(f"features in {recorded.folder}: extracted with {made_with} ({recorded.meta})")
        return
    same, detail = _digest_matches(spec, recorded)
    if same is None:
        log(f"--models {spec}: not checked against the features in {recorded.folder} "
            f"({detail}), so it only labels the result; their meta.json names {made_with}")
        return
    if same:
        log(f"--models {spec}: the features in {recorded.folder} were extracted with "
            f"{made_with}, the same weights")
        return
    theirs = f", weights sha256 {recorded.digest[:12]}" if recorded.digest and detail else ""
    ours = f" (sha256 {detail[:12]})" if detail else ""
    again = "" if spec.startswith(RANDOM_PREFIX) else \
        f", or extract them again with trex-extract {spec}"
    fix = ("move them to a folder named after the model they were extracted with (or a name "
           f"that is no model, which only labels the result){again}" if several else
           f"pass the model they were extracted with (--models {made_with}; --names sets the "
           f"name shown){again}")
    raise EvalUsageError(
        f"--models {spec}: the features in {recorded.folder} were extracted with {made_with} "
        f"({recorded.meta}{theirs}), not with the weights of {spec}{ours}; their result would "
        f"be reported as {spec}'s: {fix}")


__all__ = ["Recorded", "check_feature_model"]
