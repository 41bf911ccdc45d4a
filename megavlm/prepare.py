"""``megavlm prepare``: build what a recipe reads, before anything trains.

Why: the trainer only reads prepared files (megavlm.data); building them — downloading packages,
training a tokenizer, encoding images — is a separate step with its own failures and its own
cost, as in Megatron (``preprocess_data.py`` before ``pretrain_gpt.py``). This module is that step
for a whole recipe:

* ``data.build: demo`` — the demo corpus (megavlm.demo.corpus, from Debian packages, cached in
  ``data.root``) encoded for the recipe's ``model.vision``, and the short-answer VQA set when the
  recipe lists it (megavlm.demo.short_vqa). A second run returns at once.
* ``data.build: none`` — nothing to build; the files every stage reads (tokenizer, text, caption
  and conversation sets the stage mixtures draw from) are checked and each missing one is named.

Callers: ``megavlm prepare``, ``megavlm demo``, the sweep (once, before its jobs), and the
``megavlm train`` command (not the library trainer), which runs this step first so a README
command on a fresh machine works; ``megavlm train`` on a recipe whose files are missing fails
before it builds a model, with the files named.

    megavlm prepare --config RECIPE [key.path=value ...]
    megavlm prepare demo [--root DIR] [--num-patches 16] [--full] [--cache DIR]
    megavlm prepare --plan --config RECIPE [--dtype float8_e4m3] [--inputs KIND=GLOB]   (disk plan)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megavlm.config import ConfigError, DataConfig, RunConfig, VisionConfig, load_config
from megavlm.data.indexed import DataError
from megavlm.data.tokenizer import TokenizerError
from megavlm.demo import corpus, short_vqa
from megavlm.run_folder import set_files


def _command(config: Optional[str], overrides: Sequence[str] = ()) -> str:
    return " ".join(["megavlm prepare --config", str(config or "RECIPE"), *overrides])


def needed_files(run: RunConfig) -> list[Path]:
    """The files the recipe's stages read: the tokenizer, and every set of a kind some stage's
    mixture draws from (text ``.bin/.idx``; captions also ``.embeds.json``; conversations also
    their mask, image references and metadata)."""
    d = run.data
    kinds = {k for st in run.stages for k in ("text", "captions", "instructions") if getattr(st.mixture, k) > 0}
    out = [d.resolve(d.tokenizer)]
    for kind in ("text", "captions", "instructions"):
        if kind not in kinds:
            continue
        for name in getattr(d, kind):
            out += set_files(kind, d.resolve(name), embeds=False)
    return out


def unprepared(run: RunConfig) -> list[str]:
    """One line per thing the recipe needs that is not prepared (empty: ready to train)."""
    problems = []
    if run.data.build == "demo":
        stale = corpus.stale_sets(run.data, run.model.vision, vocab_size=run.model.vocab_size)
        if stale:
            problems.append(f"{Path(run.data.root).expanduser()}: no complete demo corpus for "
                            f"num_patches={run.model.vision.num_patches}, embed_dim={run.model.vision.embed_dim} ("
                            + ", ".join(f"set {k}: {v}" for k, v in stale.items()) + ")")
        if short_vqa.NAME in run.data.instructions and not short_vqa.is_built(run.data):
            problems.append(f"{run.data.resolve(short_vqa.NAME)}: short-answer VQA set not built")
    problems += [f"{p}: missing" for p in needed_files(run) if not p.is_file()]
    return list(dict.fromkeys(problems))


def own_data_hint(run: RunConfig) -> str:
    """The commands that make each missing kind of file of a ``build: none`` recipe (docs/own-data.md)."""
    d = run.data
    tips = []
    if not d.resolve(d.tokenizer).is_file():
        tips.append(f"python tools/train_tokenizer.py --input CORPUS.jsonl --output {d.resolve(d.tokenizer)}")
    for kind, tool in (("text", "tools/preprocess_text.py --input CORPUS.jsonl --output"),
                       ("captions", "tools/encode_images.py --input CAPTIONS.jsonl --output"),
                       ("instructions", "tools/preprocess_conversations.py --input CONVERSATIONS.json --embeds "
                        f"{d.resolve(d.captions[0]) if d.captions else 'CAPTIONS'} --output")):
        for name in getattr(d, kind):
            p = d.resolve(name)
            if not Path(f"{p}.idx").is_file():
                tips.append(f"python {tool} {p} --tokenizer {d.resolve(d.tokenizer)}")
    return "; ".join(tips) + " (see docs/own-data.md)" if tips else "see docs/own-data.md"


def require_prepared(run: RunConfig, config: Optional[str] = None, overrides: Sequence[str] = ()) -> None:
    """Raise one DataError naming what is missing and the command that prepares it."""
    problems = unprepared(run)
    if problems:
        how = (f"run `{_command(config, overrides)}` first" if run.data.build == "demo"
               else "prepare these files with the tools/ scripts: " + own_data_hint(run))
        raise DataError(f"data of this recipe is not prepared ({'; '.join(problems)}): {how}")


def prepare_recipe(run: RunConfig, progress: bool = False) -> None:
    """Build what ``run.data.build`` says (cached, under file locks); a no-op for ``build: none``."""
    if run.data.build != "demo":
        return
    corpus.ensure_demo_corpus(run.data, run.model.vision, progress=progress, vocab_size=run.model.vocab_size)
    short_vqa.ensure_short_vqa(run.data)


def prepare_demo(root: str, num_patches: int = 16, *, full: bool = False, cache: Optional[Path] = None,
                 progress: bool = True) -> Path:
    """The demo corpus alone (text, captions, conversations + held-out splits) into ``root``."""
    data = DataConfig(root=root, build="demo", instructions=["instructions"])
    corpus.ensure_demo_corpus(data, VisionConfig(embed_dim=1280, num_patches=num_patches), full=full,
                       cache=cache, progress=progress)
    return Path(root).expanduser()


def demo_parser(prog: str = "megavlm prepare demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Build the offline demo corpus from Debian packages "
                                 "(apt-get download, cached); a second run returns at once.")
    ap.add_argument("--root", default=DataConfig.root, help="where the corpus goes (default %(default)s)")
    ap.add_argument("--num-patches", type=int, default=16, help="16 = 128 px, 49 = 224 px")
    ap.add_argument("--full", action="store_true", help="all WordNet glosses and all Fashion-MNIST images")
    ap.add_argument("--cache", default=None, help="where .deb files are kept (default ~/.cache/megavlm/debs)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        from megavlm.prep.plan import main as plan_main

        return plan_main(argv)
    try:
        if argv[:1] == ["demo"]:
            a = demo_parser().parse_args(argv[1:])
            root = prepare_demo(a.root, a.num_patches, full=a.full, cache=Path(a.cache) if a.cache else None)
            print(f"demo corpora in {root}")
            return 0
        ap = argparse.ArgumentParser(prog="megavlm prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("--config", required=True, help="YAML recipe (launch/configs/*.yaml)")
        ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/tmp/demo")
        a = ap.parse_args(argv)
        run = load_config(a.config, a.overrides)
        prepare_recipe(run, progress=True)
        require_prepared(run, a.config, a.overrides)
    except (ConfigError, DataError, TokenizerError, RuntimeError) as e:
        print(f"megavlm: error: {e}", file=sys.stderr)
        return 2
    print(f"data of {a.config} ready in {Path(run.data.root).expanduser()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
