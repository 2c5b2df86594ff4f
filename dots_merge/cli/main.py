"""`dots-merge`: the command line. Thin: parse arguments, call the library, report errors in one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from dots_merge.errors import DotsMergeError

EXIT_USER_ERROR = 2


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a recipe into a model folder (streamed, bounded memory)")
    p.add_argument("recipe", help="recipe YAML: a mergekit config (any method; `dots` for DoTS)")
    p.add_argument("out_dir", help="output model folder (created when the merge is complete)")
    p.add_argument("--device", default="auto", help="where the tensor math runs: auto (default: the first GPU, else "
                   "the CPU), cpu, cuda or cuda:N")  # fmt: skip
    p.add_argument("--out-shard-size", default="5GB", metavar="SIZE", help="largest output shard, e.g. 400MB, 5GB")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt pickle checkpoints (runs their code)")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge inputs that hold NaN or Inf")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run model code from the Hub")
    p.add_argument("--cache-dir", default="default", help="pre-pass cache (default: ~/.cache/dots-merge)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the pre-pass cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from dots_merge.merge.driver import merge

    result = merge(
        args.recipe,
        args.out_dir,
        device=args.device,
        out_shard_size=args.out_shard_size,
        force=args.force,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        trust_remote_code=args.trust_remote_code,
        cache_dir=None if args.no_cache else args.cache_dir,
        quiet=args.quiet,
    )
    for model, factor in result.rescale_factors.items():
        print(f"rescale factor {factor:.4f}  {model}")
    cached = " (pre-pass from cache)" if result.prepass_cached else ""
    print(f"merged into {result.out_dir} in {result.seconds:.1f} s{cached}")
    return 0


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="task-vector diagnostics of a recipe's fine-tunes (tables, JSON, plots)")
    p.add_argument("recipe", help="recipe YAML naming a base_model and its fine-tunes")
    p.add_argument("--out", metavar="DIR", help="write analysis.json and PNG plots into DIR")
    p.add_argument("--densities", default="0.1,0.3,0.5", help="densities for the sparsified statistics")
    p.add_argument("--json", metavar="PATH", help="write the JSON report here (default: DIR/analysis.json)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt pickle checkpoints (runs their code)")
    p.add_argument("--allow-nonfinite", action="store_true", help="analyze inputs that hold NaN or Inf")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_analyze)


def _run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dots_merge.analyze import analyze, format_table, parse_densities, write_json, write_plots

    report = analyze(
        args.recipe,
        densities=parse_densities(args.densities),
        device=args.device,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        quiet=args.quiet,
    )
    print(format_table(report))
    json_path = Path(args.json) if args.json else (Path(args.out) / "analysis.json" if args.out else None)
    if json_path is not None:
        write_json(report, json_path)
        print(f"\nreport: {json_path}")
    if args.out:
        for path in write_plots(report, Path(args.out)):
            print(f"plot:   {path}")
    return 0


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search the recipe's coefficients on unlabeled queries, then merge the pick")
    p.add_argument("recipe", help="recipe YAML with a `tune:` section")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (trials, Pareto front, model/)")
    p.add_argument("--trials", type=int, help="trial budget (default: tune.trials)")
    p.add_argument("--seed", type=int, help="seed (default: tune.seed)")
    p.add_argument("--backend", choices=["bayes", "optuna", "random"], help="search backend (default: tune.backend)")
    p.add_argument("--pick", metavar="RULE",
                   help="pick rule: utopia, knee, validation (needs tune.validation), or max_/min_ an objective "
                        "(e.g. max_consistency) (default: tune.pick)")  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="stop with an error where the samples make the label-free signal doubtful (truncation, no "
                        "answers, consistency within its sampling noise) instead of warning")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (default: the first GPU, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--engine", choices=("transformers", "vllm"),
                   help="generation engine: transformers or vllm (default: tune.generation.engine; vllm needs the dots-merge[vllm] extra)")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue the run in RUN_DIR after a crash or with more trials"
    )
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="most disk for spilled task vectors (default: what the plan needs; beyond it they are "
                        "recomputed each trial)")  # fmt: skip
    p.add_argument("--keep-cache", action="store_true",
                   help="keep RUN_DIR/cache/vectors when the run ends (an interrupted run always keeps it for --resume)")  # fmt: skip
    p.add_argument("--no-merge", action="store_true", help="stop after the search: no RUN_DIR/model")
    p.add_argument("--out-shard-size", default="5GB", metavar="SIZE", help="largest shard of RUN_DIR/model")
    p.add_argument("--push", metavar="REPO_ID", help="publish RUN_DIR/model on the Hub when the run ends")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--include-queries", action="store_true", help="list the tuning prompts in the model card")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run model code from the Hub")
    g = p.add_argument_group("sharing one study between GPUs or machines (--backend optuna)")
    g.add_argument("--storage", metavar="URL",
                   help="optuna storage: sqlite:///RUN_DIR/study.db (default) or postgresql://USER@HOST/DB")  # fmt: skip
    g.add_argument("--study", metavar="NAME", help="study name in the storage (default: from the recipe and models)")
    g.add_argument("--worker", action="store_true",
                   help="only evaluate trials of the study the main process started, until its budget is done")  # fmt: skip
    g.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="a trial whose worker is silent for twice this long is retried by another (default 60)")  # fmt: skip
    p.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from dots_merge.tune.plan import parse_size
    from dots_merge.tune.run import tune

    result = tune(
        args.recipe,
        args.out,
        trials=args.trials,
        seed=args.seed,
        backend=args.backend,
        pick_rule=args.pick,
        device=args.device,
        engine=args.engine,
        resume=args.resume,
        cache_budget=parse_size(args.cache_budget, where="--cache-budget") if args.cache_budget else None,
        keep_cache=args.keep_cache,
        quiet=args.quiet,
        merge_best=not args.no_merge,
        out_shard_size=args.out_shard_size,
        push=args.push,
        private=args.private,
        include_queries=args.include_queries,
        storage=args.storage,
        study=args.study,
        worker=args.worker,
        heartbeat=args.heartbeat,
        trust_remote_code=args.trust_remote_code,
        strict=args.strict,
    )
    if result.pick is None:
        print(f"worker: evaluated {result.evaluated} trials of study {result.study}; "
              f"it holds {len(result.records)} finished trials")  # fmt: skip
        return 0
    if result.study:
        print(f"study {result.study}: this process evaluated {result.evaluated} of its trials")
    best = next(r for r in result.records if r["number"] == result.pick)
    print(f"{len(result.records)} trials; Pareto front: {', '.join(f'#{n}' for n in result.front)}")
    values = "  ".join(f"{name} {best[name]:.4f}" for name in result.objectives)
    print(f"pick ({result.rule}): trial #{result.pick}  {values}  {best['params']}")
    if "health" in best:
        h = best["health"]
        print(f"  its samples: {h['finished']:.0%} finished, {h['truncated']:.0%} truncated, "
              f"{h['no_answer']:.0%} without an answer, {h['mean_tokens']:.0f} tokens on average")  # fmt: skip
    if result.validation is not None:
        v = result.validation
        acc = v["accuracy"].get(str(result.pick))
        if acc is not None:
            print(f"validation ({v['items']} labeled problems): pick majority {acc['majority']:.3f} "
                  f"greedy {acc['greedy']:.3f}")  # fmt: skip
        print(
            "  Spearman ρ with validation accuracy: "
            + ", ".join(
                f"{name} {rho:+.2f}" if rho is not None else f"{name} n/a" for name, rho in v["spearman"].items()
            )
        )
        if v.get("note"):
            print(f"  ({v['note']})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.model_dir is not None:
        print(f"merged model: {result.model_dir}")
    if result.push_url:
        print(f"published: {result.push_url}")
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="will a tune fit? memory and disk per part, from headers only (no weights read)")
    p.add_argument("recipe", help="recipe YAML with a `tune:` section")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N (no GPU needed to plan one "
                   "with --gpu-memory)")  # fmt: skip
    p.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory to plan for, e.g. 24GiB (default: free memory)")
    p.add_argument("--host-memory", metavar="SIZE", help="host RAM to plan for (default: available RAM)")
    p.add_argument("--disk-free", metavar="SIZE", help="free disk to plan for (default: free space at --out)")
    p.add_argument("--cache-budget", metavar="SIZE", help="most disk for spilled task vectors (as for tune)")
    p.add_argument("--out", metavar="RUN_DIR", default=".", help="where the run will write (for the free disk)")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--engine", choices=("transformers", "vllm"),
                   help="generation engine: transformers or vllm (default: tune.generation.engine; vllm needs the dots-merge[vllm] extra)")  # fmt: skip
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dots_merge.fileio import write_atomic
    from dots_merge.merge.driver import as_recipe, inspect_models
    from dots_merge.recipe.tune_section import parse_tune
    from dots_merge.tune.plan import parse_size, plan_tune
    from dots_merge.tune.run import with_engine

    sizes = {
        key: parse_size(value, where=f"--{key.replace('_', '-')}") if value else None
        for key, value in (("gpu_memory", args.gpu_memory), ("host_memory", args.host_memory),
                           ("disk_free", args.disk_free), ("cache_budget", args.cache_budget))
    }  # fmt: skip
    device = args.device
    if device == "auto":
        device = "cuda:0" if sizes["gpu_memory"] is not None else _auto_device()
    if not (device == "cpu" or device.startswith("cuda")):
        raise DotsMergeError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if device == "cpu" and sizes["gpu_memory"] is not None:
        raise DotsMergeError("--gpu-memory: planning for --device cpu uses no GPU; drop it or pass --device cuda")
    recipe = with_engine(as_recipe(args.recipe), args.engine)
    spec = parse_tune(recipe)
    plan = plan_tune(recipe, spec, inspect_models(recipe), device=device, run_dir=Path(args.out), **sizes)
    print(plan.table())
    if args.json:
        write_atomic(Path(args.json), json.dumps(plan.to_json(), indent=2) + "\n")
    if not plan.fits:
        print(f"error: {plan.reason}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _auto_device() -> str:
    from dots_merge.merge.driver import resolve_device

    return resolve_device("auto")


def _add_queries(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("queries", help="choose the unlabeled tuning queries")
    qsub = p.add_subparsers(dest="queries_command", required=True)
    s = qsub.add_parser("select", help="label-free, difficulty-aware choice of tuning queries from a pool")
    s.add_argument("recipe", help="recipe YAML (its base and fine-tunes; `tune.generation` if present)")
    s.add_argument("--pool", required=True, help='JSONL pool of prompts (a "prompt" field per line)')
    s.add_argument("--n", type=int, default=16, help="how many to choose (default 16: 8 easy + 8 hard)")
    s.add_argument("--out", required=True, help="output JSONL (prompt, difficulty, split, consistencies)")
    s.add_argument("--samples", type=int, default=5, help="answers per prompt and fine-tune (default 5)")
    s.add_argument("--max-difficulty", type=float, default=0.8, help="drop prompts harder than this (default 0.8)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (default: the first GPU, else the CPU), cpu, cuda or cuda:N")
    s.add_argument("--engine", choices=("transformers", "vllm"),
                   help="generation engine: transformers or vllm (default: tune.generation.engine; vllm needs the dots-merge[vllm] extra)")  # fmt: skip
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--trust-remote-code", action="store_true", help="let transformers run model code from the Hub")
    s.set_defaults(run=_run_select)


def _run_select(args: argparse.Namespace) -> int:
    from dots_merge.tune.queries import select_queries

    rows = select_queries(
        args.recipe,
        args.pool,
        args.n,
        args.out,
        samples=args.samples,
        seed=args.seed,
        max_difficulty=args.max_difficulty,
        device=args.device,
        engine=args.engine,
        quiet=args.quiet,
        trust_remote_code=args.trust_remote_code,
    )
    easy = sum(r["split"] == "easy" for r in rows)
    print(f"chose {len(rows)} queries ({easy} easy, {len(rows) - easy} hard) into {args.out}")
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="publish a merged model folder on the Hugging Face Hub")
    p.add_argument("model_dir", help="a folder written by `dots-merge merge` or `tune` (RUN_DIR/model)")
    p.add_argument("repo_id", help="name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created when missing)")
    target.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the card metadata; no network")
    p.set_defaults(run=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from dots_merge.hub import push

    result = push(
        args.model_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
    )
    print(result.plan.describe())
    if args.dry_run:
        print("dry run: nothing was sent")
    elif result.pr_url:
        print(f"pull request: {result.pr_url}")
    else:
        print(f"committed: {result.commit_url}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline offline on a toy trio it trains itself")
    p.add_argument("--out", metavar="DIR", help="working folder (default: ~/.cache/dots-merge/demo/full-seedS, quick-seedS)")
    p.add_argument("--quick", action="store_true", help="a smoke test: a tiny trio, fewer trials (under 90 s); its numbers show nothing")
    p.add_argument("--trials", type=int, help="tuning trials (default 24; 8 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seeds the trio (a fresh one per seed), the splits and the tune")
    p.add_argument("--rebuild", action="store_true", help="train the trio again even if a matching one is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dots_merge.demo.pipeline import run_demo

    if args.trials is not None and args.trials < 1:
        raise DotsMergeError(f"--trials: must be at least 1, got {args.trials}")
    run_demo(Path(args.out) if args.out else None, quick=args.quick, trials=args.trials, seed=args.seed,
             rebuild=args.rebuild, quiet=args.quiet)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dots_merge.version import __version__

    parser = argparse.ArgumentParser(
        prog="dots-merge",
        description="Merge SFT and RLVR fine-tunes of one base model with DoTS (arXiv 2605.00610).",
    )
    parser.add_argument("--version", action="version", version=f"dots-merge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_merge(sub)
    _add_analyze(sub)
    _add_plan(sub)
    _add_tune(sub)
    _add_queries(sub)
    _add_push(sub)
    _add_demo(sub)
    return parser


def run_guarded(func: Callable[[], int], *, prog: str, debug: bool) -> int:
    """Run `func`; a user error becomes one line on stderr and exit code 2 (tracebacks only with --debug)."""
    try:
        return func()
    except DotsMergeError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        print(f"{prog}: {interrupt or 'interrupted; nothing was written to the output folder'}", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        print(
            f"{prog}: error: {type(error).__name__}: {first} (run with --debug for a traceback)",
            file=sys.stderr,
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dots-merge`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.debug:
        import transformers

        transformers.logging.set_verbosity_error()
    if getattr(args, "quiet", False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return run_guarded(lambda: args.run(args), prog="dots-merge", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
